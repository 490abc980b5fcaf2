"""A real bundle (router + cache.json, static MiniLM embedder shared by both), two real llama.cpp servers (the
SmolLM2 GGUF as both teacher and student: the gateway does not care which weights answer) and the real gateway
under uvicorn, all on 127.0.0.1 and all stopped by their fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.collect.test_llama_cpp_server import free_port, smollm2_gguf, wait_ready

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ROOT / "recipes/data/routing/mmlu_routing_450.jsonl"
LABELS = {"mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}
KEY_ENV, KEY = "OPTKIT_TEST_TEACHER_KEY", "sk-optkit-test-4f9d2c7a1b"  # the teacher server demands it
# Short prompts the gateway is tested with (the router trained on MMLU questions scores them; which way each
# goes is whatever it decides: the tests compare the gateway with the runtime, never with a fixed answer).
CANDIDATES = [
    "What is the capital of France?", "Compute the derivative of x^3 + 2x.", "Say hello.",
    "Write a Python function that reverses a list.", "Which planet is the largest?", "Name a color.",
    "Prove that the square root of 2 is irrational.", "What is 7 times 8?", "Translate 'good morning' to Spanish.",
    "If a group has order 15, how many elements of order 15 can it have?", "Who wrote Hamlet?",
    "Explain why the sky is blue.", "Give me a synonym for happy.", "What is the boiling point of water in Kelvin?",
    "Is 97 a prime number?", "List three fruits.",
]
CACHE_THRESHOLD = 0.9  # the bundle's tuned threshold stands in here: a config value, not a measured result


def _static_embedder(directory: Path, texts: list[str]) -> None:
    """MiniLM distilled into static token vectors for the tokens these texts use (route.static, partial build)."""
    from safetensors.numpy import save
    from tokenizers import Tokenizer

    from toolkit.route.static import TOKENIZER, VECTORS, build_vectors
    from toolkit.models import resolve

    tok = Tokenizer.from_file(str(Path(resolve("minilm-l6")) / TOKENIZER))
    ids = sorted({i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids})
    vectors, tok_json = build_vectors("minilm-l6", token_ids=ids)
    (directory / VECTORS).write_bytes(save({"vectors": vectors.astype(np.float16)}))
    (directory / TOKENIZER).write_bytes(Path(tok_json).read_bytes())


def _router(directory: Path) -> None:
    """A logreg router on the MMLU routing extract, static embeddings + text features; its threshold is set at
    the median score of CANDIDATES so that they split between both models."""
    from toolkit.config import RouteConfig
    from toolkit.io import read_jsonl
    from toolkit.route.labels import LabelTable
    from toolkit.route.models import FITTERS
    from toolkit.route.runtime import Router, StaticEmbedder, text_features
    from toolkit.route.stage import router_spec, save_router, standardizer

    rows = read_jsonl(EXTRACT)
    prompts = [r["prompt"] for r in rows]
    S = np.array([[float(r[c]) for c in LABELS.values()] for r in rows])
    _static_embedder(directory, prompts + CANDIDATES)
    emb = StaticEmbedder(directory).encode(prompts)
    raw = np.concatenate([emb, text_features(prompts)], axis=1)
    mean, scale = standardizer(raw)
    x = ((raw - mean) / scale).astype(np.float32)
    cfg = RouteConfig(model="logreg", embedding="static", text_features=True)
    head, w = FITTERS["logreg"](x, emb, S, cfg, 0)
    table = LabelTable([str(i) for i in range(len(rows))], prompts, S, list(LABELS),
                       np.array(["fit"] * len(rows), dtype=object))
    spec = router_spec(cfg, table, {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, np.array([0.0, 1.0]), "gpt4_1106", head)
    weights = {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in w.items()}}
    router = Router(spec, weights, StaticEmbedder(directory))
    spec["threshold"] = float(np.median(router.score(CANDIDATES)))
    save_router(directory, spec, weights)


def _cache_json(path: Path, route_dir: Path) -> None:
    from toolkit.cache.runtime import PROBES
    from toolkit.route.runtime import StaticEmbedder

    probes = StaticEmbedder(route_dir).encode(list(PROBES))
    path.write_text(json.dumps({
        "format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": CACHE_THRESHOLD,
        "embedder": {"model": "route/static_embedder (minilm-l6, static)", "revision": None,
                     "probe_vectors": probes.tolist()}, "runtime": {"ttl_s": 3600.0}}))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from toolkit.bundle import FORMAT, MANIFEST
    from toolkit.export.build import file_table

    root = tmp_path_factory.mktemp("serve") / "bundle"
    (root / "route").mkdir(parents=True)
    _router(root / "route")
    _cache_json(root / "cache.json", root / "route")
    manifest = {"format": FORMAT, "run": "serve-test", "models": [], "router": "route", "cache": "cache.json"}
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class LlamaServer:
    def __init__(self, tmp: Path, name: str, api_key: str | None = None):
        self.port, self.log, self.api_key = free_port(), tmp / f"{name}.log", api_key
        self.url = f"http://127.0.0.1:{self.port}/v1"
        # One thread each: on the shared 2-core machine spinning llama.cpp threads slow everything down.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1"]
        cmd += ["--api_key", api_key] if api_key else []
        with open(self.log, "w") as f:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def wait(self) -> "LlamaServer":
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        wait_ready(self.proc, self.url, self.log, headers=headers)
        return self


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    server = LlamaServer(tmp_path_factory.mktemp("teacher"), "teacher", api_key=KEY)
    try:
        yield server.wait()
    finally:
        _stop(server.proc)


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    server = LlamaServer(tmp_path_factory.mktemp("student"), "student")
    try:
        yield server.wait()
    finally:
        _stop(server.proc)


def serve_config(student_url: str, teacher_url: str, **over) -> dict:
    cfg = {"model_name": "optkit-test", "request_timeout_s": 60, "max_body_bytes": 20_000,
           "backends": {"student": {"base_url": student_url, "model": "smollm2-student", "timeout_s": 30,
                                    "fallback": "teacher", "max_concurrency": 4, "breaker_cooldown_s": 60},
                        "teacher": {"base_url": teacher_url, "model": "smollm2-teacher", "api_key_env": KEY_ENV,
                                    "timeout_s": 30, "max_concurrency": 4}},
           "audit": {"sample_rate": 0.0}}  # shadow checks only where a test asks for them (test_audit)
    cfg.update(over)
    return cfg


class Gateway:
    """`optkit serve` as a real process; its stdout/stderr go to a log file the tests read."""

    def __init__(self, bundle: Path, tmp: Path, cfg: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "gateway.log"
        config = tmp / "serve.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, KEY_ENV: KEY, "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "toolkit.cli", "serve", str(bundle), "--config", str(config), "--port",
               str(self.port)]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.seen: list[str] = []  # every response body and header block, for the secret scan

    def wait(self) -> "Gateway":
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"gateway did not start: {self.log.read_text()[-3000:]}")

    def post(self, path: str, body=None, headers=None, client=None, **kw):
        import httpx

        send = (client or httpx).post
        resp = send(self.url + path, json=body, headers=headers or {}, timeout=90, **kw)
        self.seen.append(resp.text + json.dumps(dict(resp.headers)))
        return resp


def start_gateway(bundle: Path, tmp: Path, cfg: dict):
    gw = Gateway(bundle, tmp, cfg)
    try:
        gw.wait()
    except Exception:
        _stop(gw.proc)
        raise
    return gw


@pytest.fixture(scope="module")
def gateway(bundle, teacher, student, tmp_path_factory):
    gw = start_gateway(bundle, tmp_path_factory.mktemp("gateway"), serve_config(student.url, teacher.url))
    try:
        yield gw
    finally:
        _stop(gw.proc)


def chat(prompt: str, stream: bool = False, **params) -> dict:
    return {"model": "optkit-test", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": 4, "stream": stream, **params}
