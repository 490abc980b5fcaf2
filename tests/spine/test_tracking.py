"""MLflow: one parent run per recipe run, nested runs per stage, batched params without secrets;
the sqlite default store, and one real `mlflow server` on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time

import pytest

from toolkit import pipeline
from toolkit.config import recipe_from_dict
from toolkit.tracking import flatten, make_tracker

from .test_pipeline import make_recipe, stages  # noqa: F401 (fixture)

SECRET = "sk-test-DO-NOT-LEAK-0123456789"


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("optkit")
    return client, client.search_runs([exp.experiment_id])


def _recipe_with_secret(workdir):
    r = make_recipe(workdir)
    r.collect.openai.api_key = SECRET  # validate_assignment turns it into a SecretStr
    return r


def test_sqlite_default_store_nested_runs_and_no_secret(workdir, stages, monkeypatch):
    import toolkit.tracking

    monkeypatch.setattr(toolkit.tracking, "BATCH", 10)  # force several log_batch calls
    r = _recipe_with_secret(workdir)
    pipeline.run_pipeline(r)
    uri = f"sqlite:///{workdir / 'artifacts' / 'mlflow.db'}"
    assert (workdir / "artifacts" / "mlflow.db").is_file()
    client, runs = _runs(uri)
    parent = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(parent) == 1 and sorted(c.data.tags["mlflow.runName"] for c in children) == ["collect", "distill"]
    p = parent[0]
    assert p.info.status == "FINISHED"
    assert p.data.params["collect.generation.max_new_tokens"] == "64"
    assert len(p.data.params) == len(flatten(r.public_dict())) > 50  # every batch arrived
    assert p.data.metrics["collect.n"] == 5
    distill = [c for c in children if c.data.tags["mlflow.runName"] == "distill"][0]
    assert [m.value for m in client.get_metric_history(distill.info.run_id, "loss")] == [1.0]
    everything = repr([(x.data.params, x.data.tags, x.data.metrics) for x in runs])
    assert SECRET not in everything
    # nor in any file the run wrote (recipe.yaml, manifests, the MLflow artifact copies)
    for path in workdir.rglob("*"):
        if path.is_file() and path.suffix != ".db":
            assert SECRET not in path.read_text(errors="ignore"), path
    assert SECRET.encode() not in (workdir / "artifacts" / "mlflow.db").read_bytes()


def test_failed_stage_marks_runs_failed(workdir, stages):
    from .test_pipeline import FAIL_AT

    FAIL_AT["n"] = 1
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(make_recipe(workdir))
    _, runs = _runs(f"sqlite:///{workdir / 'artifacts' / 'mlflow.db'}")
    assert sorted(x.info.status for x in runs) == ["FAILED", "FAILED"]


def test_two_runs_in_one_process_keep_their_own_stores(workdir, stages):
    """Regression: mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which then captured later runs."""
    first, second = workdir / "one.db", workdir / "two.db"
    for db in (first, second):
        r = make_recipe(workdir)
        r.tracking.uri = f"sqlite:///{db}"
        pipeline.run_pipeline(r, force=True)
    for db in (first, second):
        _, runs = _runs(f"sqlite:///{db}")
        assert len(runs) == 3, db
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_flatten_truncates_and_nests():
    flat = flatten({"a": {"b": {"c": 1}}, "long": "x" * 7000})
    assert flat["a.b.c"] == "1" and len(flat["long"]) == 6000


def test_env_uri_wins(workdir, monkeypatch):
    uri = f"sqlite:///{workdir / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t = make_tracker(True, "sqlite:///ignored.db", "optkit", workdir / "artifacts")
    assert t.uri == uri


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_real_mlflow_server_on_loopback(workdir, stages, monkeypatch):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
         "--default-artifact-root", str(workdir / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        import httpx

        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        pipeline.run_pipeline(_recipe_with_secret(workdir))
        client, runs = _runs(uri)
        assert len(runs) == 3 and all(x.info.status == "FINISHED" for x in runs)
        assert not (workdir / "artifacts" / "mlflow.db").exists()  # nothing went to the local default
        assert SECRET not in repr([(x.data.params, x.data.tags) for x in runs])
        arts = client.list_artifacts([x for x in runs if x.data.tags.get("mlflow.runName") == "collect"][0]
                                     .info.run_id)
        assert "manifest.json" in [a.path for a in arts]
    finally:
        server.terminate()
        server.wait(timeout=30)
