"""The gateway's edges as an OpenAI client meets them: the real app under uvicorn (in this process, on
127.0.0.1) in front of real HTTP backends (tests/collect/fake_openai_server.py, deterministic answers, counted
calls). No models: the decision path is the exact cache in front of one default backend (or a cascade), so every
test here is about the wire -- what is cached, what falls back, what is refused, what is counted."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Optional

import httpx
import pytest

from tests.collect.fake_openai_server import FakeOpenAI, answer_for
from tests.collect.test_llama_cpp_server import free_port

pytestmark = pytest.mark.server

IMAGE = "data:image/png;base64,{}"


@contextlib.contextmanager
def live(backends: dict, cascade: Optional[dict] = None, exact=None, **over):
    """The gateway app (toolkit.serve.app.create_app) under uvicorn on a free port; yields its base URL."""
    import uvicorn

    from toolkit.cache.exact import ExactStore
    from toolkit.config.serve import ServeConfig
    from toolkit.serve.app import create_app
    from toolkit.serve.decide import Decider

    cfg = ServeConfig.model_validate({"model_name": "sys", "request_timeout_s": 10, "audit": {"sample_rate": 0.0},
                                      "backends": backends, **over})
    if cascade is not None:
        from toolkit.route.cascade import FORMAT, Cascade

        cascade = Cascade({"format": FORMAT, "confidence": "mean_logprob", "weak": "s", "strong": "t", **cascade})
    decider = Decider(exact=ExactStore() if exact is None else exact, default=cfg.default_backend, cascade=cascade)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, decider), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def backend(fake: FakeOpenAI, model: str, **over) -> dict:
    return {"base_url": fake.base_url, "model": model, "timeout_s": 5, "retries": 0, **over}


def chat(content, **params) -> dict:
    return {"model": "sys", "messages": [{"role": "user", "content": content}], "temperature": 0, **params}


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


def sse_events(resp: httpx.Response) -> list:
    lines = [ln[len("data: "):] for ln in resp.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", resp.text[-300:]
    return [json.loads(ln) for ln in lines[:-1]]


def metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start))


def test_cache_keeps_images_apart_and_skips_logprob_requests():
    with FakeOpenAI(logprob_tokens=["a", "b"]) as fake, live({"student": backend(fake, "s")}) as url:
        def ask(image: str):
            return post(url, chat([{"type": "text", "text": "What is in this image?"},
                                   {"type": "image_url", "image_url": {"url": IMAGE.format(image)}}]))

        cat, dog, cat_again = ask("Y2F0"), ask("ZG9n"), ask("Y2F0")
        assert [r.status_code for r in (cat, dog, cat_again)] == [200] * 3
        assert dog.headers["x-optkit-route"] == "student"  # same text, another image: not a cache hit
        assert dog.json()["choices"][0]["message"]["content"] != cat.json()["choices"][0]["message"]["content"]
        assert cat_again.headers["x-optkit-route"] == "exact-cache"  # the same image is one
        assert cat_again.json()["choices"][0]["message"]["content"] == cat.json()["choices"][0]["message"]["content"]

        lp = [post(url, chat("Say hi.", logprobs=True, top_logprobs=1)) for _ in range(2)]
        assert [r.headers["x-optkit-route"] for r in lp] == ["student", "student"]  # a hit has no log-probs
        assert all(r.json()["choices"][0]["logprobs"]["content"] for r in lp)


def test_cached_stream_carries_usage_when_asked_and_is_counted_at_its_end():
    with FakeOpenAI() as fake, live({"student": backend(fake, "s")}) as url:
        assert post(url, chat("Stream me.")).status_code == 200
        before = metric(url, 'optkit_requests_total{endpoint="chat",route="exact-cache",status="2xx"}')
        resp = post(url, chat("Stream me.", stream=True, stream_options={"include_usage": True}))
        assert resp.headers["x-optkit-route"] == "exact-cache"
        events = sse_events(resp)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == \
            answer_for("Stream me.")
        assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 0
        plain = sse_events(post(url, chat("Stream me.", stream=True)))
        assert all(e["choices"] for e in plain)  # no usage chunk unless asked
        assert metric(url, 'optkit_requests_total{endpoint="chat",route="exact-cache",status="2xx"}') == before + 2

        streamed = post(url, chat("A fresh one.", stream=True))  # a backend stream, relayed, then counted
        assert streamed.headers["x-optkit-route"] == "student" and sse_events(streamed)
        assert metric(url, 'optkit_requests_total{endpoint="chat",route="student",status="2xx"}') == 2


def test_a_stream_its_backend_cuts_is_said_in_band_counted_as_failed_and_not_cached():
    with FakeOpenAI(cut_streams=True) as fake, live({"student": backend(fake, "s", breaker_failures=1)}) as url:
        cut = post(url, chat("Cut me.", stream=True))
        assert cut.status_code == 200  # its headers had gone out before the backend died
        assert '"code": "stream_cut"' in cut.text and "[DONE]" not in cut.text
        assert metric(url, 'optkit_requests_total{endpoint="chat",route="student",status="5xx"}') == 1
        assert metric(url, 'optkit_breaker_open{backend="student"}') == 1  # the cut counts against the backend
        fake.cut_streams = False
        whole = post(url, chat("Cut me.", stream=True))
        assert whole.headers["x-optkit-route"] == "student" and sse_events(whole)  # nothing was cached


@pytest.mark.parametrize("params, field", [
    ({"temperature": "0.5"}, "temperature"), ({"stream": "yes"}, "stream"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"top_logprobs": "abc"}, "top_logprobs"), ({"logprobs": 1}, "logprobs"), ({"n": 0}, "n"),
])
def test_wrong_types_are_refused_naming_the_field(params, field):
    with FakeOpenAI() as fake, live({"student": backend(fake, "s")}) as url:
        resp = post(url, chat("hi", **params))
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field
        assert sum(fake.hits.values()) == 0  # never forwarded
        ok = post(url, chat("hi", n=None, stream=None))  # the API's "or null": the defaults
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == answer_for("hi")


def test_refusals_and_busy_slots_fall_back_and_fallback_answers_are_not_cached():
    long = "Summarize: " + "word " * 40
    with FakeOpenAI(max_prompt_chars=60, delay_s=0.6) as small, FakeOpenAI() as big:
        backends = {"student": backend(small, "s", fallback="teacher", max_concurrency=1, queue_timeout_s=0.2),
                    "teacher": backend(big, "t")}
        with live(backends) as url:
            # The student refuses a prompt over its context (400): the teacher answers it.
            resp = post(url, chat(long))
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-optkit-route"] == "teacher"
            assert resp.headers["x-optkit-fallback"] == "student->teacher:http_400"
            # ... and that stand-in answer is not cached: the next ask tries the student again.
            again = post(url, chat(long))
            assert again.headers["x-optkit-route"] == "teacher" and small.hits[long] == 2

            # One student slot, busy for 0.6 s: a second request waits 0.2 s for it, then goes to the teacher.
            results: dict = {}
            first = threading.Thread(target=lambda: results.update(a=post(url, chat("first"))))
            first.start()
            deadline = time.monotonic() + 10
            while small.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            second = post(url, chat("second"))
            waited = time.monotonic() - started
            first.join(timeout=20)
            assert results["a"].headers["x-optkit-route"] == "student"
            assert second.headers["x-optkit-route"] == "teacher"
            assert second.headers["x-optkit-fallback"] == "student->teacher:busy"
            assert waited < 0.55  # did not wait for the student's slot
            # Neither a refusal nor busy slots count against the student: its breaker stays closed.
            assert metric(url, 'optkit_breaker_open{backend="student"}') == 0

        # With no fallback a refusal is the client's 400, in OpenAI's shape.
        with live({"student": backend(small, "s")}) as url:
            refused = post(url, chat(long))
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "backend_refused"


def test_ready_while_a_fallback_serves_and_while_the_backend_is_busy():
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    with FakeOpenAI(delay_s=1.5) as fake:
        backends = {"student": {"base_url": dead, "model": "s", "fallback": "teacher", "timeout_s": 5},
                    "teacher": backend(fake, "t", max_concurrency=1)}
        with live(backends) as url:
            ready = httpx.get(url + "/ready", timeout=10)
            assert ready.status_code == 200, ready.text  # the student's requests go to the teacher
            assert ready.json()["backends"] == {"student": False, "teacher": True}

            busy = threading.Thread(target=post, args=(url, {**chat("slow"), "model": "t"}))
            busy.start()
            deadline = time.monotonic() + 10
            while fake.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            during = httpx.get(url + "/ready", timeout=10)  # its one slot is taken: it is working, not down
            busy.join(timeout=20)
            assert during.status_code == 200 and during.json()["backends"]["teacher"] is True

        backends["teacher"]["base_url"] = dead
        with live(backends) as url:
            assert httpx.get(url + "/ready", timeout=10).status_code == 503  # nothing left to answer


def test_client_keys_and_passthrough(monkeypatch):
    key = "sk-client-7d1e0c55aa"
    monkeypatch.setenv("OPTKIT_TEST_CLIENT_KEYS", f"other-key-123, {key}")
    with FakeOpenAI() as fake, live({"student": backend(fake, "s")}, api_keys_env="OPTKIT_TEST_CLIENT_KEYS",
                                    passthrough=False) as url:
        missing = post(url, chat("hi"))
        wrong = post(url, chat("hi"), headers={"Authorization": "Bearer sk-wrong-000000"})
        assert [missing.status_code, wrong.status_code] == [401, 401]
        assert wrong.json()["error"]["code"] == "invalid_api_key" and "sk-wrong" not in wrong.text
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.post(url + "/v1/feedback", json={"id": "x", "correct": True}, timeout=10).status_code == 401
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # probes stay open
        assert sum(fake.hits.values()) == 0

        auth = {"Authorization": f"Bearer {key}"}
        assert post(url, chat("hi"), headers=auth).status_code == 200
        models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["sys"]  # passthrough off: the backend is not offered
        direct = post(url, {**chat("hi"), "model": "s"}, headers=auth)
        assert direct.status_code == 404 and direct.json()["error"]["code"] == "model_not_found"


def test_client_keys_fail_closed(monkeypatch):
    from toolkit.errors import OptkitError

    monkeypatch.delenv("OPTKIT_TEST_NO_KEYS", raising=False)
    with FakeOpenAI() as fake, pytest.raises(OptkitError, match="OPTKIT_TEST_NO_KEYS holds no key"):
        with live({"student": backend(fake, "s")}, api_keys_env="OPTKIT_TEST_NO_KEYS"):
            pass


def test_cascade_streams_tool_calls_and_never_caches_a_failed_escalation():
    # The student's log-probs are -0.1 per token (confidence -0.1): a threshold of 0 escalates every answer.
    with FakeOpenAI(logprob_tokens=["x", "y"]) as small, FakeOpenAI(always_fail=("Escalate",)) as big:
        backends = {"student": backend(small, "s"), "teacher": backend(big, "t")}
        with live(backends, cascade={"threshold": 0.0}) as url:
            tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
            resp = post(url, chat("Find it.", tools=tools, stream=True, stream_options={"include_usage": True}))
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-optkit-route"] == "teacher-escalated"
            events = sse_events(resp)
            calls = [tc for e in events if e["choices"] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
            assert [c["function"]["name"] for c in calls] == ["lookup"] and calls[0]["index"] == 0
            assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
            assert events[-1]["usage"]["prompt_tokens"] > 0  # the reply's own usage

            # The teacher fails the escalation: the student's answer is served, and not cached.
            first = post(url, chat("Escalate me."))
            assert first.status_code == 200
            assert first.headers["x-optkit-fallback"] == "teacher-escalated->student:http_5xx"
            again = post(url, chat("Escalate me."))
            assert again.headers["x-optkit-route"] != "exact-cache"
            assert big.hits["Escalate me."] == 2


def test_a_stalled_redis_never_stalls_the_event_loop(tmp_path):
    """Redis stopped (SIGSTOP: connections open, no replies) -> every store call waits out its timeouts on a
    worker thread; the gateway keeps answering other requests meanwhile, and the stalled one still succeeds."""
    import os
    import signal

    from tests.cache.test_redis_store import RedisServer
    from toolkit.cache.exact import RedisExactStore

    redis = RedisServer(tmp_path)
    try:
        with FakeOpenAI() as fake, live({"student": backend(fake, "s")}, exact=RedisExactStore(redis.url, "edge"),
                                        request_timeout_s=30) as url:
            assert post(url, chat("warm")).status_code == 200
            results: dict = {}
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                worker = threading.Thread(target=lambda: results.update(r=post(url, chat("while stalled"))))
                worker.start()
                slowest = 0.0
                while worker.is_alive():
                    started = time.monotonic()
                    assert httpx.get(url + "/health", timeout=30).status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                    time.sleep(0.05)
                worker.join()
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            assert results["r"].status_code == 200 and results["r"].headers["x-optkit-route"] == "student"
            assert slowest < 1.0  # one Redis timeout is 1 s and is retried once: a call on the loop shows >= 2 s
    finally:
        redis.stop()
