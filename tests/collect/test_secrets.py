"""API keys never reach logs, MLflow params/tags, or any file under artifacts/ (the MLflow db included)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.collect.conftest import REPO, openai_collect, write_recipe

GOOD = "sk-optkit-good-7f3a9c1e5b"
BAD = "sk-optkit-bad-2d8e4f6a0c"  # the fake server echoes a rejected key in its 401 body, like OpenAI


def optkit(workdir, recipe, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "toolkit.cli", "run", str(recipe)], cwd=workdir, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_api_keys_stay_secret(workdir, fake_openai):
    server = fake_openai(api_key=GOOD)
    tracking = {"enabled": True}
    # 1) the key inline in the recipe (a SecretStr field), a successful run
    ok = write_recipe(workdir, openai_collect(server, api_key=GOOD), data={"limit": 4}, name="inline",
                      tracking=tracking)
    # 2) a wrong key from the environment: the run fails, and the server's error message contains the key
    bad = write_recipe(workdir, openai_collect(server, api_key_env="OPTKIT_TEST_KEY"), data={"limit": 4},
                       name="envkey", tracking=tracking)
    first = optkit(workdir, ok)
    second = optkit(workdir, bad, OPTKIT_TEST_KEY=BAD)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 2 and "rejected the API key" in second.stderr
    assert f"Bearer {GOOD}" in server.auth_seen and f"Bearer {BAD}" in server.auth_seen  # the keys were used

    logs = first.stdout + first.stderr + second.stdout + second.stderr
    assert GOOD not in logs and BAD not in logs and "***" in second.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'artifacts' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = {k: v for r in runs for k, v in r.data.params.items()}
    assert "collect.openai.base_url" in params and len(runs) == 4  # 2 recipe runs + 2 stage runs were logged
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values(), *run.data.params.keys()]:
            assert GOOD not in value and BAD not in value

    files = [p for p in (workdir / "artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "manifest.json" for p in files)
    for path in files:
        data = path.read_bytes()
        assert GOOD.encode() not in data and BAD.encode() not in data, path


def test_url_credentials_stay_out_of_the_manifest_and_error_lines(workdir, fake_openai, capsys):
    """collect.openai.base_url with user:password (and a key in the query): the collect manifest and summary
    show it redacted, and an error line about an unreachable endpoint never prints the password."""
    import json

    from toolkit.cli import main

    server = fake_openai()
    secret_url = server.base_url.replace("http://", "http://alice:pw-7f3a9c1e@") + "?api_key=qk-55aa77"
    assert main(["run", str(write_recipe(workdir, openai_collect(server, base_url=secret_url),
                                         data={"limit": 2}))]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    for name in ("manifest.json", "summary.json"):
        text = (out / name).read_text()
        assert "pw-7f3a9c1e" not in text and "qk-55aa77" not in text and "***@127.0.0.1" in text, name
    assert json.loads((out / "summary.json").read_text())["teacher"]["base_url"].startswith("http://***@127.0.0.1")

    capsys.readouterr()
    dead = "http://bob:pw-0c0ffee1@127.0.0.1:9/v1"  # port 9 (discard): nothing listens
    code = main(["run", str(write_recipe(workdir, openai_collect(server, base_url=dead), data={"limit": 2},
                                         name="dead"))])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the endpoint" in err and "pw-0c0ffee1" not in err and "***@127.0.0.1:9" in err


def test_a_key_with_a_line_break_is_used_trimmed_or_refused_never_echoed(workdir, fake_openai):
    """Keys read from secret files end in a newline: httpx refused the header and its error, which quotes the
    header, went to stderr and into the failed stage's manifest."""
    server = fake_openai(api_key=GOOD)
    recipe = write_recipe(workdir, openai_collect(server, api_key_env="OPTKIT_TEST_KEY"), data={"limit": 2})
    trailing = optkit(workdir, recipe, OPTKIT_TEST_KEY=GOOD + "\n")
    assert trailing.returncode == 0, trailing.stderr
    assert server.auth_seen and set(server.auth_seen) == {f"Bearer {GOOD}"}
    inner = GOOD[:8] + "\n" + GOOD[8:]
    other = write_recipe(workdir, openai_collect(server, api_key_env="OPTKIT_TEST_KEY"), data={"limit": 3})
    broken = optkit(workdir, other, OPTKIT_TEST_KEY=inner)
    assert broken.returncode == 2 and "contains a control character" in broken.stderr
    for text in (broken.stdout + broken.stderr, *(p.read_text(errors="replace")
                                                 for p in (workdir / "artifacts").rglob("*.json"))):
        assert GOOD[8:] not in text and GOOD[:8] + "\\n" not in text


def test_an_address_that_never_answers_fails_fast_not_once_per_prompt(workdir):
    """A connect timeout before any reply (wrong private IP, firewall) was retried per prompt: 10k prompts x 6
    attempts x timeout_s. Now it is the same one-line error as a refused connection."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # a full accept queue: connections hang in SYN like a black-holed address
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    port = listener.getsockname()[1]
    collect = {"backend": "openai", "generation": {"max_new_tokens": 4},
               "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "timeout_s": 1.0,
                          "max_retries": 3, "concurrency": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02}}
    started = time.monotonic()
    try:
        out = optkit(workdir, write_recipe(workdir, collect, data={"limit": 12}))
    finally:
        for s in [*fillers, listener]:
            s.close()
    assert out.returncode == 2 and "cannot reach the endpoint" in out.stderr and "no connection within 1s" in out.stderr
    assert time.monotonic() - started < 60
