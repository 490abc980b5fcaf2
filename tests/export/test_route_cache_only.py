"""Route-only and cache-only recipes (no teacher, no data) run end to end with `optkit run` on the shipped data
extracts: the route stage on the MMLU routing labels (file), the cache stage on CLINC150 pairs (file), then export.
A route-only bundle's serve.sh starts the real gateway (`optkit serve`) in front of the router's models, their
URLs and model names taken from the environment; here two OpenAI-compatible servers on 127.0.0.1 stand in for
them (tests/collect/fake_openai_server.py: real HTTP, deterministic answers)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.collect.fake_openai_server import FakeOpenAI
from toolkit.cli import main
from toolkit.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
MMLU = REPO / "recipes" / "data" / "routing" / "mmlu_routing_450.jsonl"
CLINC = REPO / "recipes" / "data" / "clinc150" / "clinc150_cache_pairs.csv"


def _write(workdir: Path, recipe: dict) -> Path:
    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump({"tracking": {"enabled": False}, **recipe}, sort_keys=False))
    return path


ROUTE_ONLY = {"name": "ro", "route": {
    "labels": {"source": "file", "path": str(MMLU), "prompt_column": "prompt",
               "score_columns": {"mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}},
    "costs": {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, "model": "knn", "k": 25, "select": []},
    "export": {"port": 8300}}


@pytest.fixture(scope="module")
def route_bundle(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("route_only")
    path = _write(workdir, ROUTE_ONLY)
    recipe = load_recipe(path)
    assert recipe.teacher is None and recipe.data is None
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["run", str(path)]) == 0
    finally:
        os.chdir(cwd)
    return workdir / "artifacts" / "ro" / "export" / "bundle"


def test_route_only_recipe_runs_and_its_serve_yaml_fronts_the_router_models(route_bundle):
    router = json.loads((route_bundle / "route" / "router.json").read_text())
    assert sorted(router["models"]) == ["gpt4_1106", "mixtral_8x7b"] and router["strong"] == "gpt4_1106"
    serve = yaml.safe_load((route_bundle / "serve.yaml").read_text())
    assert serve["routes"] == {"gpt4_1106": "gpt4_1106", "mixtral_8x7b": "mixtral_8x7b"}
    assert serve["default_backend"] == "gpt4_1106"
    assert serve["backends"]["mixtral_8x7b"]["fallback"] == "gpt4_1106"
    assert {b["base_url"] for b in serve["backends"].values()} == {"http://127.0.0.1:8300/v1",
                                                                    "http://127.0.0.1:8301/v1"}
    manifest = json.loads((route_bundle / "manifest.json").read_text())
    assert manifest["models"] == [] and manifest["router"] == "route" and manifest["recipe"]["teacher"] is None
    assert main(["verify", str(route_bundle)]) == 0


def test_route_only_serve_sh_is_valid_bash_and_names_its_env(route_bundle):
    script = route_bundle / "serve.sh"
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for var in ("OPTKIT_GPT4_1106_URL", "OPTKIT_MIXTRAL_8X7B_URL", "OPTKIT_GPT4_1106_MODEL", "OPTKIT_STRONG_URL",
                "OPTKIT_WEAK_URL"):
        assert var in text, var
    assert 'exec optkit serve . --config "$config"' in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "gateway" in usage.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_route_only_serve_sh_starts_the_gateway_in_front_of_env_named_backends(route_bundle, tmp_path):
    """./serve.sh gateway with OPTKIT_STRONG_URL / OPTKIT_WEAK_URL (and a model name override) starts the real
    gateway; a chat request is routed by the bundle's router to one of the two servers, which sees the model
    name from the environment."""
    strong, weak = FakeOpenAI().start(), FakeOpenAI().start()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "optkit").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m toolkit.cli "$@"\n')
    (shim / "optkit").chmod(0o755)  # `optkit` as installed: this checkout's CLI
    port = _free_port()
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path),
           "OPTKIT_STRONG_URL": strong.base_url, "OPTKIT_WEAK_URL": weak.base_url,
           "OPTKIT_GPT4_1106_MODEL": "strong-model"}
    log = open(tmp_path / "gateway.log", "w")
    proc = subprocess.Popen(["bash", str(route_bundle / "serve.sh"), "gateway", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("gateway did not start: " + (tmp_path / "gateway.log").read_text()[-3000:])
        config = next(tmp_path.glob("optkit-serve.*"))  # what serve.sh handed to the gateway
        backends = yaml.safe_load(config.read_text())["backends"]
        assert backends["gpt4_1106"]["base_url"] == strong.base_url
        assert backends["mixtral_8x7b"]["base_url"] == weak.base_url
        assert backends["gpt4_1106"]["model"] == "strong-model" and backends["mixtral_8x7b"]["model"] == "mixtral_8x7b"
        prompts = ["What is 2 + 2?\nA. 3\nB. 4\nAnswer:",
                   json.loads(MMLU.read_text().splitlines()[0])["prompt"]]
        routes = []
        for p in prompts:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                           json={"model": "ro", "messages": [{"role": "user", "content": p}], "max_tokens": 4})
            assert r.status_code == 200, r.text
            routes.append(r.headers["x-optkit-route"])
        assert set(routes) <= {"gpt4_1106", "mixtral_8x7b"}
        seen = {"gpt4_1106": strong, "mixtral_8x7b": weak}
        for name, server in seen.items():
            assert len(server.bodies) == routes.count(name)  # each request reached the backend it was routed to
        assert all(b["model"] == "strong-model" for b in strong.bodies)
        assert all(b["model"] == "mixtral_8x7b" for b in weak.bodies)
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        strong.stop()
        weak.stop()


def test_cache_only_recipe_runs_and_exports_a_gateway_bundle(workdir):
    path = _write(workdir, {"name": "co", "cache": {"pairs_path": str(CLINC), "query_column": "text_a",
                                                    "cached_column": "text_b", "label_column": "label",
                                                    "max_pairs": 600, "epsilon": 0.1, "stress": False},
                            "export": {}})
    assert main(["run", str(path)]) == 0
    run = workdir / "artifacts" / "co"
    summary = json.loads((run / "cache" / "manifest.json").read_text())
    assert summary["status"] == "done"
    bundle = run / "export" / "bundle"
    cache = json.loads((bundle / "cache.json").read_text())
    assert "threshold" in json.dumps(cache)
    serve = yaml.safe_load((bundle / "serve.yaml").read_text())
    assert serve["default_backend"] == "teacher" and list(serve["backends"]) == ["teacher"]
    text = (bundle / "serve.sh").read_text()
    assert "OPTKIT_TEACHER_URL" in text and subprocess.run(["bash", "-n", str(bundle / "serve.sh")]).returncode == 0
    assert main(["verify", str(bundle)]) == 0
