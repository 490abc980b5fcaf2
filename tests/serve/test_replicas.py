"""Scale-out: two real gateway replicas (uvicorn, `optkit serve`) with `cache.store: redis` in front of one real
llama.cpp server share their cache, exact and semantic layers, through one real redis-server (password-protected,
URL in an env var): an answer fetched through replica A is a cache hit on replica B (an exact hit for the same
text, also for a bundle with no cache.json) and the other way round, tenants stay apart across replicas, and the
Redis password is in no log line, response or metric."""

from __future__ import annotations

import json
import shutil
import uuid

import httpx
import pytest

from tests.cache.test_redis_store import RedisServer
from tests.serve.conftest import Gateway, _stop, chat, serve_config

pytestmark = [pytest.mark.slow, pytest.mark.server]
URL_ENV = "OPTKIT_TEST_REDIS_URL"
CACHE_ROUTES = ("exact-cache", "semantic-cache")


@pytest.fixture(scope="module")
def secret_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-replicas"), password="pw-" + uuid.uuid4().hex)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(bundle, student, secret_redis, tmp_path_factory):
    """Replicas A and B: the same bundle and serve.yaml (both backends = the one llama.cpp server)."""
    cfg = serve_config(student.url, student.url, cache={"store": "redis", "redis_url_env": URL_ENV})
    yield from _start_replicas(bundle, cfg, "AB", secret_redis, tmp_path_factory)


def _start_replicas(bundle, cfg, names: str, redis, tmp_path_factory):
    """Gateways over one bundle and serve.yaml, started at once (each loads the bundle); stopped afterwards."""
    gateways = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(URL_ENV, redis.url)  # the replicas inherit it; it is not in serve.yaml
        try:
            for name in names:
                gateways.append(Gateway(bundle, tmp_path_factory.mktemp(f"replica-{name}"), cfg))
            for gw in gateways:
                gw.wait()
            yield gateways
        finally:
            for gw in gateways:
                _stop(gw.proc)


@pytest.fixture(scope="module")
def exact_only_replicas(bundle, student, secret_redis, tmp_path_factory):
    """Replicas over a bundle with no cache.json (router only): their exact layer alone, shared through Redis."""
    from toolkit.bundle import FORMAT, MANIFEST
    from toolkit.export.build import file_table

    root = tmp_path_factory.mktemp("exact-only") / "bundle"
    shutil.copytree(bundle / "route", root / "route")
    manifest = {"format": FORMAT, "run": "serve-test-exact", "models": [], "router": "route"}
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest))
    cfg = serve_config(student.url, student.url, cache={"store": "redis", "redis_url_env": URL_ENV,
                                                        "redis_prefix": "exact-only"})
    yield from _start_replicas(root, cfg, "CD", secret_redis, tmp_path_factory)


def ask(gw, prompt: str, tenant: str, **kw):
    resp = gw.post("/v1/chat/completions", chat(prompt, **kw), headers={"Authorization": f"Bearer {tenant}"})
    assert resp.status_code == 200, resp.text
    return resp


def assert_exact_hit_across(first_gw, other_gw, prompt: str, tenant: str) -> None:
    """A miss answered through one replica is an exact-cache hit, with the same answer, on the other."""
    first = ask(first_gw, prompt, tenant)
    assert first.headers["x-optkit-route"] in ("student", "teacher")
    hit = ask(other_gw, prompt, tenant)
    assert hit.headers["x-optkit-route"] == "exact-cache", hit.headers
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]


def test_an_answer_through_one_replica_is_a_hit_on_the_other(replicas):
    a, b = replicas
    first = ask(a, "What is the capital of France?", "client-r")
    assert first.headers["x-optkit-route"] in ("student", "teacher")  # a miss: the backend answered
    hit = ask(b, "What is the capital of France?", "client-r")
    assert hit.headers["x-optkit-route"] in CACHE_ROUTES  # B never saw the prompt: the hit came through Redis
    assert float(hit.headers["x-optkit-cache-similarity"]) > 0.999
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    # The other way round, and a cached answer streamed by the replica that did not fetch it.
    fresh = ask(b, "Who wrote Hamlet?", "client-r")
    assert fresh.headers["x-optkit-route"] in ("student", "teacher")
    streamed = ask(a, "Who wrote Hamlet?", "client-r", stream=True)
    assert streamed.headers["x-optkit-route"] in CACHE_ROUTES and "data: [DONE]" in streamed.text


def test_an_exact_repeat_is_an_exact_hit_on_the_other_replica(replicas):
    """One exact layer, shared: the same text through B is served by the exact layer A filled (not re-embedded and
    matched by the semantic layer), with params and system prompt still part of the key."""
    a, b = replicas
    assert_exact_hit_across(a, b, "Give me a synonym for happy.", "client-x")
    other = ask(b, "Give me a synonym for happy.", "client-x", max_tokens=3)  # another parameter: another key
    assert other.headers["x-optkit-route"] in ("student", "teacher")
    system = b.post("/v1/chat/completions", {**chat("Give me a synonym for happy."), "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Give me a synonym for happy."}]},
        headers={"Authorization": "Bearer client-x"})
    assert system.status_code == 200 and system.headers["x-optkit-route"] in ("student", "teacher")


def test_an_exact_only_bundle_shares_exact_hits(exact_only_replicas):
    c, d = exact_only_replicas
    assert_exact_hit_across(c, d, "Which planet is the largest?", "client-e")
    assert ask(d, "Which planet is the largest?", "client-f").headers["x-optkit-route"] in ("student", "teacher")
    assert ask(c, "which planet is the largest?", "client-e").headers["x-optkit-route"] in ("student", "teacher")


def test_tenants_stay_apart_across_replicas(replicas):
    a, b = replicas
    ask(a, "Name a color.", "tenant-one")
    other = ask(b, "Name a color.", "tenant-two")  # same prompt, another tenant, the other replica: no hit
    assert other.headers["x-optkit-route"] in ("student", "teacher")
    assert ask(b, "Name a color.", "tenant-one").headers["x-optkit-route"] in CACHE_ROUTES


def test_the_redis_password_is_never_written(replicas, secret_redis):
    secret = secret_redis.password
    for gw in replicas:
        text = httpx.get(gw.url + "/metrics", timeout=10).text
        log = gw.log.read_text()
        assert "redis://***@127.0.0.1" in log  # it did use Redis, and said so, redacted
        assert secret not in log and secret not in text and all(secret not in s for s in gw.seen)
