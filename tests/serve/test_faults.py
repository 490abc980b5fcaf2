"""Faults, live: the student killed mid-load (0 failed requests: all fell back to the teacher), a dead student
behind an opening circuit breaker, and a rate-limiting teacher retried within the request deadline."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

from tests.collect.fake_openai_server import FakeOpenAI, answer_for
from tests.serve.conftest import CANDIDATES, KEY, LlamaServer, _stop, chat, serve_config, start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.server]


def student_prompts(bundle) -> list[str]:
    """The candidates the bundle's router sends to the cheap model (the student backend)."""
    from toolkit.bundle import Bundle

    router = Bundle.open(bundle).router()
    return [p for p, m in zip(CANDIDATES, router.route_batch(CANDIDATES)) if m != router.strong]


def test_student_killed_mid_load_no_request_fails(bundle, teacher, tmp_path):
    student = LlamaServer(tmp_path, "student").wait()
    gw = None
    try:
        gw = start_gateway(bundle, tmp_path, serve_config(student.url, teacher.url))
        prompts = student_prompts(bundle)
        assert prompts, "the router sends none of the candidates to the student"
        work = [prompts[i % len(prompts)] for i in range(24)]
        done, killed = [], threading.Event()

        def one(prompt):
            resp = gw.post("/v1/chat/completions", chat(prompt), headers={"Cache-Control": "no-cache"})
            done.append(resp)
            if len(done) >= 5 and not killed.is_set():
                killed.set()
                student.proc.kill()  # SIGKILL while other requests are in flight on it
            return resp

        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, work))
        assert killed.is_set()
        failed = [r.text[:200] for r in results if r.status_code != 200]
        assert failed == [], failed
        routes = [r.headers["x-optkit-route"] for r in results]
        assert "student" in routes and "teacher" in routes
        assert all(r.headers["x-optkit-decision"] == "student" for r in results)  # the router chose the student
        fell = [r.headers["x-optkit-fallback"] for r in results if "x-optkit-fallback" in r.headers]
        assert fell and all(f.startswith("student->teacher:") for f in fell)
        assert any(f.endswith("breaker_open") for f in fell)  # later requests skip the dead student at once
        ready = httpx.get(gw.url + "/ready", timeout=10)  # still ready: the student's requests reach the teacher
        assert ready.status_code == 200 and ready.json()["backends"] == {"student": False, "teacher": True}
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        assert 'optkit_fallbacks_total{dst="teacher",reason="breaker_open",src="student"}' in metrics
        assert 'optkit_breaker_open{backend="student"} 1.0' in metrics
    finally:
        if gw is not None:
            _stop(gw.proc)
        _stop(student.proc)


def test_slow_student_and_rate_limited_teacher_within_deadline(bundle, tmp_path):
    """The student answers too late (over its 0.5 s deadline) -> the teacher, which rate-limits twice
    (Retry-After honoured); a Retry-After past the request deadline fails fast; concurrency stays bounded."""
    prompts = student_prompts(bundle)
    slow = FakeOpenAI(delay_s=3.0).start()
    fake = FakeOpenAI(api_key=KEY, faults={"429": 1.0}, fault_attempts=2, retry_after="0.3").start()
    backends = serve_config(slow.base_url, fake.base_url)["backends"]
    backends["student"]["timeout_s"] = 0.5
    gw = start_gateway(bundle, tmp_path, serve_config(slow.base_url, fake.base_url, request_timeout_s=4,
                                                      backends=backends))
    try:
        resp = gw.post("/v1/chat/completions", chat(prompts[0]))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-optkit-route"] == "teacher"
        assert resp.headers["x-optkit-fallback"] == "student->teacher:timeout"
        assert resp.json()["choices"][0]["message"]["content"] == answer_for(prompts[0])
        times = fake.attempt_times[prompts[0]]
        assert len(times) == 3 and min(b - a for a, b in zip(times, times[1:])) >= 0.3  # Retry-After honoured
        assert set(fake.auth_seen) == {f"Bearer {KEY}"}  # the teacher's key from the env, not the client's

        fake.retry_after = "30"  # longer than the request deadline: fail now instead of waiting past it
        started = time.monotonic()
        late = gw.post("/v1/chat/completions", chat(prompts[1]))
        assert late.status_code == 502 and late.json()["error"]["code"] == "http_429"
        assert time.monotonic() - started < 4

        fake.faults, fake.delay_s, fake.max_in_flight = {}, 0.4, 0
        with cf.ThreadPoolExecutor(10) as pool:  # straight to the teacher (its model named): 4 slots
            many = list(pool.map(lambda i: gw.post("/v1/completions", {"model": "smollm2-teacher",
                                                                        "prompt": f"p{i}", "max_tokens": 2}),
                                 range(10)))
        assert [r.status_code for r in many] == [200] * 10
        assert fake.max_in_flight == 4  # backends.teacher.max_concurrency
        for text in [gw.log.read_text(), late.text, *gw.seen]:
            assert KEY not in text
    finally:
        _stop(gw.proc)
        slow.stop()
        fake.stop()
