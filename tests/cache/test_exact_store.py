"""The one exact-match layer (toolkit/cache/exact.py), memory and Redis behind the same get / put: two Redis stores
with their own clients (two replicas: they share nothing but the real redis-server) see each other's entries,
namespaces never cross (also with eight threads writing the same texts everywhere), TTL and max_entries hold in
Redis, a tampered or colliding value is not served, and Redis down is a miss, never an error."""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.cache.test_redis_store import RedisServer
from toolkit.cache.exact import ExactStore, RedisExactStore, exact_store
from toolkit.errors import OptkitError

NAMESPACES = ["acme", {"tenant": "acme"}, {"tenant": "acme", "model": "x"}, {"tenant": "acme", "model": "y"},
              {"tenant": "acme", "model": "x", "context": "sys-a"}, {"tenant": "acme", "model": "x", "params": "t=0"}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-exact"))
    yield server
    server.stop()


def pair(url: str, **kw) -> tuple[RedisExactStore, RedisExactStore]:
    prefix = "x" + uuid.uuid4().hex[:10]
    return RedisExactStore(url, prefix, **kw), RedisExactStore(url, prefix, **kw)


@pytest.mark.server
def test_a_put_on_one_replica_is_a_hit_on_the_other(redis_server):
    a, b = pair(redis_server.url)
    answer = {"text": "Réinitialisez-le ici ✓", "finish_reason": "stop"}
    assert b.get("reset my password", "t1") is None
    a.put("reset my password", answer, "t1")
    assert b.get("reset   my password", "t1") == answer  # normalized whitespace, through Redis
    assert b.get("Reset my password", "t1") is None  # case is kept: it can change meaning
    assert b.get("reset my password", "t2") is None and b.get("reset my password", {"tenant": "t1"}) is None
    b.put_many(["a", "b"], [{"v": 1}, {"v": 2}], "t2")
    assert a.get("b", "t2") == {"v": 2} and len(a) == len(b) == 3
    b.put("reset my password", {"text": "newer"}, "t1")  # a newer answer replaces the old one everywhere
    assert a.get("reset my password", "t1") == {"text": "newer"} and len(a) == 3


@pytest.mark.server
def test_namespaces_never_cross_under_concurrent_writers(redis_server):
    """Eight threads over two replicas write the same texts into every namespace and read random pairs back:
    every hit carries the namespace (and text) it was asked with."""
    stores = pair(redis_server.url)
    local = ExactStore()  # the memory store under the same load

    def work(seed: int) -> tuple[int, list]:
        rng, hits, crossed = np.random.default_rng(seed), 0, []
        store = stores[seed % 2] if seed < 4 else local
        for i in range(120):
            ns, n = NAMESPACES[int(rng.integers(len(NAMESPACES)))], int(rng.integers(6))
            store.put(f"question {n}", {"ns": ns, "q": f"question {n}", "i": i}, ns)
            ask, m = NAMESPACES[int(rng.integers(len(NAMESPACES)))], int(rng.integers(6))
            got = store.get(f"question {m}", ask)
            if got is not None:
                hits += 1
                if got["ns"] != ask or got["q"] != f"question {m}":
                    crossed.append((ask, m, got))
        return hits, crossed

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert all(c == [] for _, c in results), [c for _, c in results if c][:1]
    assert all(h > 20 for h, _ in results)  # the check ran on real hits
    # Both replicas agree with what Redis holds afterwards.
    for ns in NAMESPACES:
        for n in range(6):
            assert stores[0].get(f"question {n}", ns) == stores[1].get(f"question {n}", ns)


@pytest.mark.server
def test_ttl_and_max_entries_hold_in_redis(redis_server):
    a, b = pair(redis_server.url, ttl_s=1.0, max_entries=5)
    for i in range(8):
        a.put(f"q{i}", {"i": i}, "n")
    assert len(b) == 5 and b.get("q2", "n") is None and b.get("q3", "n") == {"i": 3}  # the oldest went
    keys = list(redis_server.client.scan_iter(match=f"{a.base}:k:*"))
    assert len(keys) == 5 and all(0 < redis_server.client.pttl(k) <= 1000 for k in keys)
    time.sleep(1.3)
    assert b.get("q7", "n") is None  # expired by Redis's clock
    other = RedisExactStore(redis_server.url, a.base[1:].split(":")[0], ttl_s=60.0, max_entries=5)
    assert other.base != a.base  # another TTL: another key space, nothing shared


@pytest.mark.server
def test_a_value_for_another_namespace_or_text_is_not_served(redis_server):
    a, _ = pair(redis_server.url)
    a.put("hello", {"v": 1}, "t1")
    key = next(redis_server.client.scan_iter(match=f"{a.base}:k:*"))
    value = json.loads(redis_server.client.get(key))
    redis_server.client.set(key, json.dumps({**value, "n": '"t2"'}))  # as if two namespaces collided
    assert a.get("hello", "t1") is None
    redis_server.client.set(key, "{not json")
    assert a.get("hello", "t1") is None
    with pytest.raises(OptkitError, match="JSON values"):
        a.put("x", {"v": float("nan")}, "t1")


@pytest.mark.server
def test_redis_down_is_a_miss_and_the_password_is_never_logged(tmp_path, caplog):
    secret = "pw-" + uuid.uuid4().hex
    server = RedisServer(tmp_path, password=secret)
    try:
        store = exact_store(10, None, store="redis", redis_url=server.url, redis_prefix="down")
        store.put("q", {"a": 1}, "t")
        assert store.get("q", "t") == {"a": 1}
    finally:
        server.stop()
    with caplog.at_level(logging.INFO, logger="optkit.cache"):
        assert store.get("q", "t") is None  # down: a miss, not an exception
        store.put("r", {"a": 2}, "t")  # dropped, not raised
        with pytest.raises(OptkitError) as err:
            RedisExactStore(server.url, "down", timeout_s=0.5)
    assert "exact get failed" in caplog.text and secret not in caplog.text
    assert secret not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_memory_store_is_the_default():
    assert isinstance(exact_store(10, 5.0), ExactStore)


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.server)])
def test_a_tenant_quota_spans_its_contexts_and_spares_other_tenants(store, request):
    """The gateway's exact layer had no quota: one tenant's traffic (each conversation context its own namespace)
    evicted every other tenant's exact entries through max_entries. With a quota per tenant (quota_by="tenant",
    as the semantic layer counts it) its inserts evict only its own oldest entries, in memory and in Redis."""
    kw = dict(max_entries=20, quota=3, quota_by="tenant", ttl_s=60.0)
    if store == "redis":
        server = request.getfixturevalue("redis_server")
        a, b = pair(server.url, **kw)
    else:
        a = b = ExactStore(**kw)
    a.put("keep me", {"v": "u"}, {"tenant": "u", "context": "0"})
    for i in range(30):
        (a if i % 2 else b).put(f"q{i}", {"v": i}, {"tenant": "t", "context": str(i)})
    assert len(a) == 4 and b.get("keep me", {"tenant": "u", "context": "0"}) == {"v": "u"}
    assert [i for i in range(30) if a.get(f"q{i}", {"tenant": "t", "context": str(i)})] == [27, 28, 29]
    b.put("q28", {"v": "newer"}, {"tenant": "t", "context": "28"})  # a replacement is not a fourth entry
    assert len(a) == 4 and a.get("q27", {"tenant": "t", "context": "27"}) == {"v": 27}
    unbounded = ExactStore(max_entries=20)  # no quota: the flood evicts the other tenant
    unbounded.put("keep me", {"v": "u"}, {"tenant": "u", "context": "0"})
    for i in range(30):
        unbounded.put(f"q{i}", {"v": i}, {"tenant": "t", "context": str(i)})
    assert unbounded.get("keep me", {"tenant": "u", "context": "0"}) is None
