"""The gateway in cascade mode, against two real llama.cpp servers (SmolLM2 GGUF as student and teacher): it
escalates exactly the answers whose confidence, computed by the runtime function on the student's own reply,
is below the bundle's threshold. The threshold is set at the median confidence of the prompts sent (a config
value so that they split, not a calibrated result: calibration is tested in tests/route/test_cascade.py)."""

import json
import shutil

import numpy as np
import pytest

from tests.collect.test_llama_cpp_server import free_port, smollm2_gguf, start_llama_server, wait_ready
from tests.serve.conftest import CANDIDATES, KEY, _stop, chat, serve_config, start_gateway
from toolkit.route.cascade import Cascade, token_logprobs_of

PROMPTS = CANDIDATES[:8]
# llama-cpp-python's server reuses the longest cached token prefix of the previous request. A prompt asked twice in
# a row is then re-evaluated as one batch-1 token instead of a batch, and the different rounding flips near-ties:
# measured on an AVX2 host, "Name a color." answered "The color I'm" (mean log-prob -1.41) and, asked again at
# once, "Alec " (-1.94). So every request scored here follows this same unrelated one: the server's state before
# it, and with it the arithmetic, is identical whether the gateway or the test asks.
RESET = "Zebras: one fact."


@pytest.fixture(scope="module")
def scoring_student(tmp_path_factory):
    """A llama.cpp server that returns token log-probs (logits_all)."""
    pytest.importorskip("llama_cpp")
    port, log = free_port(), tmp_path_factory.mktemp("cascade_student") / "server.log"
    proc = start_llama_server(smollm2_gguf(), port, log, logits_all=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        _stop(proc)


def _ask(url: str, prompt: str, key: str | None = None) -> dict:
    import httpx

    body = {**chat(prompt), "model": "smollm2-student", "logprobs": True, "top_logprobs": 1}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.post(url + "/chat/completions", json=body, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _direct(url: str, prompt: str) -> dict:
    """The student's own greedy reply with log-probs, asked from the same server state as the gateway asks."""
    _ask(url, RESET)
    return _ask(url, prompt)


@pytest.fixture(scope="module")
def cascade_gateway(bundle, teacher, scoring_student, tmp_path_factory):
    from toolkit.export.build import file_table

    confidences = {p: Cascade({"format": "optkit-cascade/1", "confidence": "mean_logprob", "threshold": 0.0,
                               "weak": "student", "strong": "teacher"}).confidence(
        token_logprobs_of(_direct(scoring_student, p))) for p in PROMPTS}
    threshold = float(np.median(list(confidences.values())))
    tmp = tmp_path_factory.mktemp("cascade_bundle")
    root = tmp / "bundle"
    shutil.copytree(bundle, root)
    spec = {"format": "optkit-cascade/1", "confidence": "mean_logprob", "threshold": threshold,
            "weak": "student", "strong": "gpt4_1106"}  # the router's strong model name maps to the teacher
    (root / "route/cascade.json").write_text(json.dumps(spec))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["cascade"] = "route/cascade.json"
    manifest["files"] = file_table(root)  # (list_files leaves manifest.json out)
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = serve_config(scoring_student, teacher.url, cache={"enabled": False})
    gw = start_gateway(root, tmp, cfg)
    try:
        yield gw, Cascade.load(root / "route/cascade.json"), confidences
    finally:
        _stop(gw.proc)


def test_gateway_escalates_exactly_below_the_threshold(cascade_gateway, scoring_student):
    gw, cascade, confidences = cascade_gateway
    routes = []
    for prompt in PROMPTS:
        direct = _direct(scoring_student, prompt)  # the student's own reply, fetched directly (greedy)
        want_conf, want_escalate = cascade.decide(token_logprobs_of(direct))
        _ask(scoring_student, RESET)
        resp = gw.post("/v1/chat/completions", chat(prompt))
        assert resp.status_code == 200, resp.text
        route = resp.headers["x-optkit-route"]
        routes.append(route)
        got_conf = float(resp.headers["x-optkit-cascade-confidence"])
        assert float(resp.headers["x-optkit-cascade-threshold"]) == pytest.approx(cascade.threshold, rel=1e-4)
        # the gateway's decision is the runtime function's on the confidence it measured, exactly
        assert route == ("teacher-escalated" if cascade.escalate(got_conf) else "student"), (prompt, got_conf)
        # ... and that confidence is the student's own (the header carries 6 significant digits)
        assert got_conf == pytest.approx(want_conf, rel=1e-5, abs=1e-5), prompt
        assert route == ("teacher-escalated" if want_escalate else "student"), (prompt, want_conf)
        choice = resp.json()["choices"][0]
        assert choice["message"]["content"] and choice.get("logprobs") is None  # not asked for: not passed on
        if route == "student":
            assert choice["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert "student" in routes and "teacher-escalated" in routes  # the median threshold splits them


def test_cascade_streams_the_final_answer(cascade_gateway, scoring_student, teacher):
    gw, cascade, confidences = cascade_gateway
    prompt = min(confidences, key=confidences.get)  # the least confident: escalated

    def ask(body: dict):  # both servers in the same state before each ask (see RESET)
        _ask(scoring_student, RESET), _ask(teacher.url, RESET, KEY)
        return gw.post("/v1/chat/completions", body)

    plain = ask(chat(prompt))
    resp = ask(chat(prompt, stream=True))
    assert resp.status_code == 200 and resp.headers["x-optkit-route"] == "teacher-escalated"
    events = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == plain.json()["choices"][0]["message"]["content"]
