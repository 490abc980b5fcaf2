"""Credentials in URLs (issue 12.8): a real `optkit run` whose teacher endpoint carries a password and an api_key
query parameter (and whose API key sits in the environment) fails to connect; the secrets appear in no file under
the artifacts dir (recipe.yaml, manifests, work files, the MLflow store), no MLflow param or tag, and not on
stderr."""

import os
import socket
import subprocess
import sys

import pytest

from toolkit.config import recipe_from_dict
from toolkit.redact import MASK
from toolkit.tracking import flatten

SECRETS = ("s3cr3tpw", "k3yk3y", "sk-envsecret123")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


def _recipe_text(port: int) -> str:
    return ("name: sec\nteacher: {model: gpt-x}\ndata: {path: d.jsonl}\ncollect:\n  backend: openai\n"
            f"  openai: {{base_url: 'http://alice:s3cr3tpw@127.0.0.1:{port}/v1?api_key=k3yk3y&x=1', "
            "max_retries: 0, timeout_s: 2}\n")


def test_public_dict_and_params_mask_url_credentials():
    r = recipe_from_dict({"name": "t", "teacher": {"model": "m"}, "data": {"path": "d.jsonl"},
                          "collect": {"backend": "openai", "openai": {
                              "base_url": "http://alice:s3cr3tpw@host/v1?api_key=k3yk3y", "api_key": "sk-inline"}}})
    public = r.public_dict()
    assert public["collect"]["openai"]["base_url"] == f"http://{MASK}@host/v1?api_key={MASK}"
    assert "api_key" not in public["collect"]["openai"]
    text = repr(flatten(public))
    assert not any(s in text for s in ("s3cr3tpw", "k3yk3y", "sk-inline"))
    assert r.collect.openai.base_url.startswith("http://alice:s3cr3tpw@")  # the run itself still gets the real URL


@pytest.mark.slow
def test_no_secret_reaches_any_file_param_or_stderr(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "hello there"}\n{"prompt": "second one"}\n')
    (tmp_path / "r.yaml").write_text(_recipe_text(_closed_port()))
    env = {**os.environ, "OPENAI_API_KEY": "sk-envsecret123"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", "run", "r.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and f"http://{MASK}@127.0.0.1" in p.stderr
    for s in SECRETS:
        assert s not in p.stderr and s not in p.stdout
    files = [f for f in (tmp_path / "artifacts").rglob("*") if f.is_file()]
    assert any(f.name == "recipe.yaml" for f in files) and any(f.name == "mlflow.db" for f in files)
    for f in files:
        data = f.read_bytes()
        for s in SECRETS:
            assert s.encode() not in data, (f, s)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'artifacts' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        blob = repr(run.data.params) + repr(run.data.tags)
        assert not any(s in blob for s in SECRETS)
    params = {k: v for run in runs for k, v in run.data.params.items()}
    assert params["collect.openai.base_url"].startswith(f"http://{MASK}@127.0.0.1")
