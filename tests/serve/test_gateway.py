"""The gateway live (uvicorn, a real process) in front of two real llama.cpp servers: its decisions equal the
runtime Router / SemanticCache called directly, streaming, bad requests, tenants, metrics, and the teacher's key
nowhere. Tests in this module share one gateway (and its cache): each uses its own namespace or prompts."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

from tests.serve.conftest import CANDIDATES, KEY, chat

pytestmark = [pytest.mark.slow, pytest.mark.server]
# The bundle's router: its strong model goes to the teacher backend, the other to the student (serve's default).
BACKEND_OF = {"gpt4_1106": "teacher", "mixtral_8x7b": "student"}


@pytest.fixture(scope="module")
def runtime(bundle):
    """The bundle's Router and a fresh SemanticCache, loaded through the public runtime APIs."""
    from toolkit.bundle import Bundle

    b = Bundle.open(bundle)
    router = b.router()
    return router, lambda: b.cache(embedder=router.embedder)


def content(resp: httpx.Response) -> str:
    return resp.json()["choices"][0]["message"]["content"]


def expect(router, cache, prompt: str, ns) -> tuple[str, object]:
    hit = cache.lookup(prompt, ns)
    if hit is not None:
        return ("exact-cache" if hit.exact else "semantic-cache"), hit
    return BACKEND_OF[router.route(prompt)], None


def test_decisions_equal_runtime_and_offline_replay(gateway, runtime, monkeypatch):
    router, new_cache = runtime
    cache = new_cache()
    prompts = CANDIDATES[:10] + CANDIDATES[:3] + [p.lower().rstrip("?.") for p in CANDIDATES[:4]]
    routes, responses = [], []
    for prompt in prompts:
        resp = gateway.post("/v1/chat/completions", chat(prompt), headers={"Authorization": "Bearer client-a"})
        assert resp.status_code == 200, resp.text
        want, hit = expect(router, cache, prompt, "client-a")
        assert resp.headers["x-optkit-decision"] == want, prompt
        assert resp.headers["x-optkit-route"] == want  # nothing failed, so nothing fell back
        routes.append(want)
        responses.append(resp)
        if hit is not None:
            assert content(resp) == hit.answer
            assert float(resp.headers["x-optkit-cache-similarity"]) == pytest.approx(hit.similarity, abs=1e-4)
        else:
            assert float(resp.headers["x-optkit-router-score"]) == pytest.approx(router.score([prompt])[0], abs=1e-5)
            assert float(resp.headers["x-optkit-router-threshold"]) == pytest.approx(router.threshold, abs=1e-5)
            assert float(resp.headers["x-optkit-backend-latency-ms"]) > 0
            assert resp.json()["usage"]["completion_tokens"] >= 1  # a model really answered
            cache.insert(prompt, content(resp), "client-a")
    assert set(routes) == {"exact-cache", "semantic-cache", "student", "teacher"}, routes
    replayed = replay_decisions(prompts, [content(r) for r in responses], router, new_cache(), monkeypatch)
    assert replayed == [{"exact-cache": "exact", "semantic-cache": "semantic"}.get(r, r) for r in routes]


def replay_decisions(prompts, outputs, router, cache, monkeypatch) -> list[str]:
    """evaluate's offline system replay over the same prompts, each model answering what the gateway's backend
    answered: its served_by column must equal the gateway's decisions."""
    from types import SimpleNamespace

    from toolkit.evaluate import system

    monkeypatch.setattr(system, "load_parts", lambda ctx: (router, cache))  # the bundle's parts, not a run's
    ctx = SimpleNamespace(config=SimpleNamespace(system=SimpleNamespace(exact_cache=True, student="student")))
    records = [{"id": str(i), "prompt": p, "output": o} for i, (p, o) in enumerate(zip(prompts, outputs))]
    answers = {v: {r["id"]: {"output": r["output"]} for r in records} for v in ("student", "teacher")}
    rows = {v: {"e2e_mean_s": 0.1} for v in ("student", "teacher")}
    _, log_rows = system.replay(ctx, records, [], answers, rows, lambda v, row: 0.0, 0.0, "exact", None)
    return [r["served_by"] for r in log_rows]


def test_streaming_and_cache_control(gateway):
    body = chat("Who painted the Mona Lisa?", stream=True, max_tokens=5)  # own namespace: max_tokens differs
    first = gateway.post("/v1/chat/completions", body)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/event-stream")
    assert first.headers["x-optkit-route"] in ("student", "teacher")
    streamed = sse_text(first.text)
    again = gateway.post("/v1/chat/completions", body)
    assert again.headers["x-optkit-route"] == "exact-cache" and sse_text(again.text) == streamed
    plain = gateway.post("/v1/chat/completions", {**body, "stream": False})
    assert plain.headers["x-optkit-route"] == "exact-cache" and content(plain) == streamed
    fresh = gateway.post("/v1/chat/completions", {**body, "stream": False}, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-optkit-route"] in ("student", "teacher")
    sampled = gateway.post("/v1/chat/completions", {**body, "stream": False, "temperature": 0.7})
    assert sampled.headers["x-optkit-route"] in ("student", "teacher")  # temperature > 0: never from the cache
    direct = gateway.post("/v1/completions", {"model": "smollm2-student", "prompt": "Hi", "max_tokens": 3})
    assert direct.status_code == 200 and direct.headers["x-optkit-route"] == "student"
    assert "x-optkit-router-score" not in direct.headers  # named a backend model: passed through, not routed


def sse_text(raw: str) -> str:
    events = [line[5:].strip() for line in raw.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


BAD = [
    (b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"model": "optkit-test"}).encode(), 400),
    (json.dumps({"model": "optkit-test", "messages": "hi"}).encode(), 400),
    (json.dumps({"model": "optkit-test", "messages": []}).encode(), 400),
    (json.dumps({"model": "optkit-test", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"model": "optkit-test", "messages": [{"role": "user", "content": 5}]}).encode(), 400),
    (json.dumps({**chat("x"), "temperature": "hot"}).encode(), 400),
    (json.dumps({**chat("x"), "max_tokens": -3}).encode(), 400),
    (json.dumps({**chat("x"), "model": "gpt-9"}).encode(), 404),
    (b"\xff\xfe\x00garbage", 400), (b"[" * 50_000, 413), (json.dumps(chat("x" * 30_000)).encode(), 413),
    (b"[" * 10_000, 400),  # deep nesting under the size limit
]


def test_bad_requests_get_openai_errors(gateway):
    for raw, status in BAD:
        resp = httpx.post(gateway.url + "/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == status, (raw[:60], resp.text[:200])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        resp = httpx.request(method, gateway.url + path, timeout=10)
        assert resp.status_code == status and "error" in resp.json()
    bad = gateway.post("/v1/completions", {"model": "optkit-test", "prompt": ["a", "b"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert httpx.get(gateway.url + "/health", timeout=10).json() == {"status": "ok"}  # still alive


def test_tenants_never_share_a_hit_under_concurrency(gateway, runtime):
    """Three tenants send the same prompts at once, each in its own order; each tenant's decisions must equal a
    runtime cache that holds only that tenant's own answers (a hit from another tenant would break that)."""
    router, new_cache = runtime
    prompts = ["What is the capital of Italy?", "what is the capital of italy", "What is 6 times 7?",
               "What is the capital of Italy?"]
    tenants = {f"tenant-{i}": prompts[i:] + prompts[:i] for i in range(3)}

    def run(tenant):
        with httpx.Client() as client:
            return [gateway.post("/v1/chat/completions", chat(p, max_tokens=3), client=client,
                                 headers={"Authorization": f"Bearer {tenant}"}) for p in tenants[tenant]]

    with cf.ThreadPoolExecutor(3) as pool:
        results = dict(zip(tenants, pool.map(run, tenants)))
    for tenant, responses in results.items():
        cache = new_cache()
        for prompt, resp in zip(tenants[tenant], responses):
            assert resp.status_code == 200, resp.text
            want, _ = expect(router, cache, prompt, tenant)
            assert resp.headers["x-optkit-decision"] == want, (tenant, prompt)
            if want in ("student", "teacher"):
                cache.insert(prompt, content(resp), tenant)
    firsts = [r[0].headers["x-optkit-route"] for r in results.values()]
    assert all(f in ("student", "teacher") for f in firsts)  # nobody's first request came from the cache


def test_models_ready_metrics_and_no_key_anywhere(gateway):
    ids = [m["id"] for m in httpx.get(gateway.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == ["optkit-test", "smollm2-student", "smollm2-teacher"]
    ready = httpx.get(gateway.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["backends"] == {"student": True, "teacher": True}
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    for line in ('optkit_requests_total{endpoint="chat",route="exact-cache",status="2xx"}',
                 'optkit_cache_hits_total{layer="semantic-cache"}', 'optkit_backend_seconds_count{backend="teacher"}',
                 'optkit_errors_total{type="invalid_json"}', "optkit_decision_seconds_bucket"):
        assert line in metrics, line
    log = gateway.log.read_text()
    assert "POST /v1/chat/completions" in log  # the access log is on, so the scan below means something
    for text in [metrics, log, *gateway.seen]:
        assert KEY not in text and KEY[3:] not in text
