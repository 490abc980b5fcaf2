"""cache.store: redis — SemanticCache replicas in separate processes sharing one real redis-server (started here on
127.0.0.1, no persistence): a hit inserted by one is served by the other, TTL is shared, namespaces never cross
under concurrent writers, quotas and max_entries hold across replicas, a lagging replica re-reads a trimmed log,
and a Redis outage is a miss, never an error (nor a logged password)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.collect.test_llama_cpp_server import free_port

pytestmark = pytest.mark.server  # a real redis-server on 127.0.0.1
ROOT = Path(__file__).resolve().parents[2]
DIM = 32
THRESHOLD = 0.8


def word_embedder(texts):
    """Bag of words over fixed random unit vectors (sha256-seeded: equal in every process). 'a b c' vs 'a b c d'
    has cosine 3/sqrt(12) = 0.866 > THRESHOLD; texts without shared words are near-orthogonal."""
    out = np.zeros((len(texts), DIM), np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            out[i] += np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- redis-server


class RedisServer:
    """A real redis-server on 127.0.0.1 and a free port, no persistence; `url` carries the password if set."""

    def __init__(self, tmp: Path, password: str | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (bash .ci/setup_redis.sh installs Debian's)")
        pytest.importorskip("redis", reason="the redis client comes with optkit[serve]")
        self.port, self.password, self.log = free_port(), password, tmp / "redis.log"
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp)] + (["--requirepass", password] if password else [])
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.client = self._wait()

    def _wait(self):
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-1000:]}")
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------- replicas


def _worker_main() -> None:
    """A replica: one RedisSemanticCache in its own process, driven by JSON lines on stdin."""
    from toolkit.cache.store_redis import RedisSemanticCache

    cache = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op, out = cmd["op"], None
        if op == "open":
            cache = RedisSemanticCache(THRESHOLD, word_embedder, url=cmd["url"], prefix=cmd["prefix"],
                                       **cmd["settings"])
        elif op == "insert":
            for q, answer, ns in cmd["items"]:
                cache.insert(q, answer, ns)
        elif op == "lookup":
            hit = cache.lookup(cmd["q"], cmd["ns"])
            out = None if hit is None else {"answer": hit.answer, "similarity": hit.similarity, "exact": hit.exact,
                                            "namespace": hit.namespace, "age_s": hit.age_s}
        elif op == "len":
            out = len(cache)
        elif op == "stress":  # two threads each inserting and looking up, interleaved
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                parts = list(pool.map(lambda k: _stress(cache, cmd, 2 * cmd["seed"] + k), range(2)))
            out = {"hits": sum(p["hits"] for p in parts), "crossed": [c for p in parts for c in p["crossed"]]}
        sys.stdout.write(json.dumps({"ok": out}) + "\n")
        sys.stdout.flush()


def _stress(cache, cmd: dict, seed: int) -> dict:
    """Every hit must come from the namespace asked, while both replicas write the same queries everywhere."""
    rng, out, names = np.random.default_rng(seed), {"hits": 0, "crossed": []}, cmd["namespaces"]
    for i in range(cmd["rounds"]):
        ns, n = names[int(rng.integers(len(names)))], int(rng.integers(cmd["queries"]))
        cache.insert(f"question {n} about topic{n}", {"ns": ns, "writer": cmd["name"], "i": i}, ns)
        ask = names[int(rng.integers(len(names)))]
        hit = cache.lookup(f"question {int(rng.integers(cmd['queries']))} about", ask)
        if hit is not None:
            out["hits"] += 1
            if hit.answer["ns"] != ask:
                out["crossed"].append([ask, hit.answer])
    return out


class Replica:
    def __init__(self, name: str):
        self.name = name
        code = "from tests.cache.test_redis_store import _worker_main; _worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env={**__import__("os").environ,
                                                               "OMP_WAIT_POLICY": "PASSIVE"})

    def send(self, op: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def reply(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"replica {self.name} died (rc {self.proc.wait(timeout=10)})")
        return json.loads(line)["ok"]

    def __call__(self, op: str, **kw):
        self.send(op, **kw)
        return self.reply()

    def lookup(self, q: str, ns):
        return self("lookup", q=q, ns=ns)


@pytest.fixture(scope="module")
def replicas(redis_server):
    pair = [Replica("A"), Replica("B")]
    yield pair
    for r in pair:
        r.proc.stdin.close()
        r.proc.wait(timeout=20)


def _open(replicas, url: str, **settings) -> str:
    prefix = "t" + uuid.uuid4().hex[:10]
    for r in replicas:
        r("open", url=url, prefix=prefix, settings=settings)
    return prefix


# ---------------------------------------------------------------------------------------------- tests


def test_insert_in_one_process_hits_in_the_other(redis_server, replicas):
    a, b = replicas
    _open(replicas, redis_server.url)
    answer = {"choices": [{"message": {"content": "Réinitialisez-le ici ✓"}}], "n": [1, 2.5, None, True]}
    assert b.lookup("reset my password", "tenant-1") is None  # B mirrors the namespace (empty) first
    a("insert", items=[["reset my password", answer, "tenant-1"]])
    hit = b.lookup("reset   my password", "tenant-1")  # the exact layer (normalized whitespace), in B
    assert hit is not None and hit["exact"] and hit["answer"] == answer and hit["namespace"] == '"tenant-1"'
    near = b.lookup("reset my password please", "tenant-1")  # the semantic layer: cosine 0.866 >= 0.8
    assert near is not None and not near["exact"] and THRESHOLD <= near["similarity"] < 0.9
    assert near["answer"] == answer
    assert b.lookup("reset my password", "tenant-2") is None  # another namespace
    assert b.lookup("reset my password", {"tenant": "tenant-1"}) is None  # a mapping is another namespace too
    assert b.lookup("weather in paris", "tenant-1") is None
    b("insert", items=[["weather in paris", {"a": 2}, "tenant-2"]])  # and the other way round
    assert a.lookup("weather in paris", "tenant-2")["answer"] == {"a": 2}
    assert a("len") == b("len") == 2


def test_a_newer_answer_replaces_the_older_on_every_replica(redis_server, replicas):
    a, b = replicas
    _open(replicas, redis_server.url)
    a("insert", items=[["cancel my order", {"v": 1}, "t"]])
    assert b.lookup("cancel my order", "t")["answer"] == {"v": 1}
    b("insert", items=[["cancel my order", {"v": 2}, "t"]])
    for r in replicas:
        assert r.lookup("cancel my order", "t")["answer"] == {"v": 2}
        assert r.lookup("cancel my order now", "t")["answer"] == {"v": 2}  # no stale duplicate in the mirror
    assert a("len") == 1


def test_ttl_is_shared_and_redis_expires_the_keys(redis_server, replicas):
    a, b = replicas
    prefix = _open(replicas, redis_server.url, ttl_s=1.0)
    a("insert", items=[["transfer money to anna", {"ok": 1}, "t"]])
    hit = b.lookup("transfer money to anna", "t")
    assert hit is not None and 0 <= hit["age_s"] < 1.0  # age judged by Redis's clock
    keys = [k for k in redis_server.client.scan_iter(match=f"{{{prefix}:*}}:e:*")]
    assert len(keys) == 1 and 0 < redis_server.client.pttl(keys[0]) <= 1000
    time.sleep(1.3)
    assert b.lookup("transfer money to anna", "t") is None  # B had it mirrored: expired there too
    assert a.lookup("transfer money to anna", "t") is None
    assert a("len") == 0 and redis_server.client.exists(keys[0]) == 0


def test_namespaces_never_cross_under_concurrent_writers(redis_server, replicas):
    """Both replicas (two threads each) write the same queries into the same namespaces at once (quota evictions
    and replacements racing) while looking up random (query, namespace) pairs: every hit carries the namespace it
    was asked in."""
    a, b = replicas
    _open(replicas, redis_server.url, max_entries_per_namespace=6, max_entries=40)
    namespaces = ["acme", {"tenant": "acme"}, "acme|model=x", {"tenant": "acme", "model": "x"}, "globex"]
    for i, r in enumerate(replicas):
        r.send("stress", name=r.name, seed=i, rounds=150, queries=8, namespaces=namespaces)
    results = [r.reply() for r in replicas]
    for res in results:
        assert res["crossed"] == [], res["crossed"][:3]
        assert res["hits"] > 50  # the check ran on real hits
    assert a("len") <= 30  # 5 namespaces x quota 6
    # Afterwards both mirrors converge on what Redis holds: the same answer for every (query, namespace).
    def view(hit):
        return None if hit is None else (hit["answer"], hit["exact"])

    held = 0
    for ns in namespaces:
        for n in range(8):
            q = f"question {n} about topic{n}"
            got = view(a.lookup(q, ns))
            assert got == view(b.lookup(q, ns)), (q, ns)
            held += got is not None and got[1]  # exact: the entry itself
    assert held == a("len") > 0  # and every entry Redis holds is in both mirrors


def test_quota_and_max_entries_hold_across_replicas(redis_server, replicas):
    a, b = replicas
    _open(replicas, redis_server.url, max_entries_per_namespace=5, max_entries=12)
    xs = [f"x{i} alpha" for i in range(10)]
    assert all(b.lookup(q, "x") is None for q in xs)  # B mirrors x before the writes
    for i in range(5):  # alternating writers: the namespace keeps its 5 newest, whoever wrote them
        a("insert", items=[[xs[2 * i], {"i": 2 * i}, "x"]])
        b("insert", items=[[xs[2 * i + 1], {"i": 2 * i + 1}, "x"]])
    assert [q for q in xs if b.lookup(q, "x") is not None] == xs[5:]
    assert a("len") == 5
    a("insert", items=[[f"y{i} beta", {"i": i}, "y"] for i in range(5)])
    b("insert", items=[[f"z{i} gamma", {"i": i}, "z"] for i in range(5)])
    assert a("len") == 12  # max_entries: x lost its 3 oldest entries, not y or z
    for r in replicas:  # B learns of the evictions (del events) before it serves anything
        assert [q for q in xs if r.lookup(q, "x") is not None] == xs[8:]
        assert all(r.lookup(f"z{i} gamma", "z") is not None for i in range(5))


def test_quota_by_tenant_holds_across_replicas_and_namespaces(redis_server, replicas):
    """The gateway counts the quota per tenant across its conversation contexts (quota_by="tenant"), in Redis as
    in memory: tenant t's five contexts written through both replicas keep its 3 newest entries, tenant u's entry
    is never evicted by them."""
    a, b = replicas
    _open(replicas, redis_server.url, max_entries_per_namespace=3, max_entries=40, quota_by="tenant")
    u = {"tenant": "u", "context": "0"}
    b("insert", items=[["kept question here", {"u": 1}, u]])
    for i in range(5):
        (a if i % 2 else b)("insert", items=[[f"q{i} alpha", {"i": i}, {"tenant": "t", "context": str(i)}]])
    assert a("len") == 4
    for r in replicas:
        assert [i for i in range(5) if r.lookup(f"q{i} alpha", {"tenant": "t", "context": str(i)})] == [2, 3, 4]
        assert r.lookup("kept question here", u)["answer"] == {"u": 1}
    # Without a quota no tenant set is kept: each held every id it ever saw (expired ones were never purged)
    prefix = _open(replicas, redis_server.url, max_entries=40, quota_by="tenant", ttl_s=60.0)
    a("insert", items=[[f"w{i} beta", {"i": i}, {"tenant": "t", "context": str(i)}] for i in range(3)])
    assert a("len") == 3 and not list(redis_server.client.scan_iter(match=f"{{{prefix}:*:g:*"))


def test_a_replica_behind_the_trimmed_log_rereads_the_namespace(redis_server, monkeypatch):
    from toolkit.cache import store_redis

    monkeypatch.setattr(store_redis, "LOG_MAXLEN", 50)
    url, prefix = redis_server.url, "trim" + uuid.uuid4().hex[:8]
    a = store_redis.RedisSemanticCache(THRESHOLD, word_embedder, url=url, prefix=prefix, max_entries_per_namespace=20)
    b = store_redis.RedisSemanticCache(THRESHOLD, word_embedder, url=url, prefix=prefix, max_entries_per_namespace=20)
    a.insert("first question kept", {"i": -1}, "n")
    assert b.lookup("first question kept", "n") is not None
    before = b._states['"n"'].ver
    a.insert_many([f"q{i} {i}x {i}y" for i in range(600)], [{"i": i} for i in range(600)], "n")
    first = redis_server.client.xrange(f"{a.base}:ns:{store_redis._digest(json.dumps('n'))}:log", count=1)[0][1]
    assert int(first[b"prev"]) != before  # the events after B's position are gone: B must re-read
    assert b.lookup("first question kept", "n") is None
    assert [i for i in range(600) if b.lookup(f"q{i} {i}x {i}y", "n") is not None] == list(range(580, 600))
    assert b._live == 20
    a.close(), b.close()


def test_redis_down_is_a_miss_and_the_password_is_never_logged(tmp_path, caplog):
    from toolkit.cache.store_redis import RedisSemanticCache
    from toolkit.errors import OptkitError

    secret = "pw-" + uuid.uuid4().hex
    server = RedisServer(tmp_path, password=secret)
    try:
        cache = RedisSemanticCache(THRESHOLD, word_embedder, url=server.url, prefix="down", timeout_s=0.5)
        cache.insert("how do i reset my password", {"a": 1}, "t")
        assert cache.lookup("how do i reset my password", "t") is not None
    finally:
        server.stop()
    with caplog.at_level(logging.INFO, logger="optkit.cache"):
        started = time.monotonic()
        assert cache.lookup("how do i reset my password", "t") is None  # down: a miss, not an exception
        cache.insert("another question", {"a": 2}, "t")  # skipped, not raised
        assert time.monotonic() - started < 5
        with pytest.raises(OptkitError) as err:
            RedisSemanticCache(THRESHOLD, word_embedder, url=server.url, prefix="down", timeout_s=0.5)
    assert "cache: redis" in caplog.text and "serving misses" in caplog.text
    assert secret not in caplog.text and secret not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_load_chooses_the_store_and_configs_that_differ_do_not_share(redis_server, tmp_path):
    from toolkit.cache.runtime import PROBES, SemanticCache
    from toolkit.cache.store_redis import RedisSemanticCache

    path = tmp_path / "cache.json"
    path.write_text(json.dumps({
        "format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": THRESHOLD,
        "embedder": {"model": "word-hash", "probe_vectors": word_embedder(list(PROBES)).tolist()},
        "runtime": {"ttl_s": 60.0}}))
    prefix = "load" + uuid.uuid4().hex[:8]
    a = SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix)
    b = SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix)
    c = SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix,
                           ttl_s=30.0)
    assert isinstance(a, RedisSemanticCache) and a.ttl_s == 60.0 and a.base == b.base != c.base
    a.insert("cancel my order", {"x": 1}, "t")
    assert b.lookup("cancel my order", "t") is not None and c.lookup("cancel my order", "t") is None
    with pytest.raises(Exception, match="JSON"):
        a.insert("not json", {1, 2}, "t")
    # A learned metric (cache.metric diagonal) scores the same shared unit vectors with its weights: 'a b c' vs
    # 'a b c d' is ~0.89 by cosine (a hit at 0.8), half that with every weight 0.5 (a miss at 0.47); the replica
    # shares the entries (same embedder, same vectors) and scores 'a b c' itself 0.5.
    cfg = json.loads(path.read_text())
    cfg["similarity"], cfg["threshold"] = {"kind": "diagonal", "weights": [0.5] * DIM}, 0.47
    path.write_text(json.dumps(cfg))
    d = SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix)
    a.insert("a b c", {"x": 2}, "w")
    cosine = a.lookup("a b c d", "w", exact=False).similarity
    assert 0.8 < cosine < 0.94
    assert isinstance(d, RedisSemanticCache) and list(d.weights[:2]) == [0.5, 0.5]
    assert d.lookup("a b c d", "w", exact=False) is None
    assert d.lookup("a b c", "w", exact=False).similarity == pytest.approx(0.5, abs=1e-5)
    # The memory store stays the default and never imports the redis client.
    code = ("import sys, json; from toolkit.cache import SemanticCache; "
            f"c = SemanticCache.load({str(path)!r}, lambda t: __import__('tests.cache.test_redis_store', "
            "fromlist=['x']).word_embedder(t)); c.insert('a b', 1); "
            "print(type(c).__name__, 'redis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["SemanticCache", "False"], out.stderr[-2000:]


def test_a_query_threshold_is_applied_by_every_replica(redis_server, tmp_path):
    """cache.adaptive: query: replicas share the entries and each applies the per-query threshold from the
    reference file beside cache.json. Reference: queries about orders whose neighbours were reusable (label 1) and
    queries about refunds whose neighbours were not (label 0); slopes that lower the threshold by the neighbours'
    label rate. 'cancel my order now' then hits 'cancel my order' (cosine ~0.9 >= 1.2 - 1.0) while 'refund my money
    now' misses 'refund my money' at a cosine above the global threshold (its threshold: 1.2)."""
    from toolkit.cache import local
    from toolkit.cache.runtime import PROBES, SemanticCache, l2_normalize
    from toolkit.errors import OptkitError

    texts = [f"{a} my order {w}" for a in ("cancel", "change", "track") for w in "abcdefghijklmn"] + \
            [f"refund my money {w}" for w in "abcdefghijklmnopqrstuvwxyzopq"]
    labels = np.array([1] * 42 + [0] * 29)
    slopes = np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    gate = local.Gate(1.2, slopes, l2_normalize(word_embedder(texts)), labels, -1.0, THRESHOLD)
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({
        "format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": THRESHOLD,
        "embedder": {"model": "word-hash", "probe_vectors": word_embedder(list(PROBES)).tolist()},
        "query_threshold": local.spec(gate, local.save_reference(tmp_path / local.REFERENCE_FILE, gate), "test")}))
    prefix = "gate" + uuid.uuid4().hex[:8]
    a, b = (SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix)
            for _ in range(2))
    a.insert("cancel my order", 1, "t")
    a.insert("refund my money", 2, "t")
    for replica in (a, b):
        assert replica.query_gate is not None and replica.query_gate.fallback == THRESHOLD
        hit = replica.lookup("cancel my order now", "t", exact=False)
        assert hit is not None and hit.answer == 1 and hit.similarity > THRESHOLD
        assert replica.lookup("refund my money now", "t", exact=False) is None
    # The global threshold alone would have served the refund: the gate, not the cosine, refused it.
    v = l2_normalize(word_embedder(["refund my money now", "refund my money"]))
    assert v[0] @ v[1] > THRESHOLD
    (tmp_path / local.REFERENCE_FILE).unlink()  # the reference file is part of the config: without it, no cache
    with pytest.raises(OptkitError, match="query_threshold.reference"):
        SemanticCache.load(path, word_embedder, store="redis", redis_url=redis_server.url, redis_prefix=prefix)


def test_serve_yaml_store_settings(tmp_path, monkeypatch):
    """serve.yaml names the store; a password never sits in the file (nor in its error), the env var wins."""
    import yaml

    from toolkit.config.serve import load_serve_config
    from toolkit.errors import OptkitError

    def load(cache: dict):
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump({"backends": {"student": {"base_url": "http://127.0.0.1:9/v1",
                                                                 "model": "m"}}, "cache": cache}))
        return load_serve_config(path).cache

    assert load({}).store_settings() == {}  # memory, the default
    with pytest.raises(OptkitError) as err:
        load({"store": "redis", "redis_url": "redis://:hunter2-secret@10.0.0.1:6379/0"})
    assert "credentials" in str(err.value) and "hunter2-secret" not in str(err.value)
    with pytest.raises(OptkitError, match="redis_url"):
        load({"store": "redis", "redis_url": "http://10.0.0.1:6379"})
    policy = load({"store": "redis", "redis_url": "redis://10.0.0.1:6379/2", "redis_prefix": "prod-a"})
    monkeypatch.delenv("OPTKIT_REDIS_URL", raising=False)
    assert policy.store_settings() == {"store": "redis", "redis_url": "redis://10.0.0.1:6379/2",
                                       "redis_prefix": "prod-a"}
    monkeypatch.setenv("OPTKIT_REDIS_URL", "redis://:pw@10.0.0.2:6379/0")
    assert policy.store_settings()["redis_url"] == "redis://:pw@10.0.0.2:6379/0"
    monkeypatch.delenv("OPTKIT_REDIS_URL")
    with pytest.raises(OptkitError, match="OPTKIT_REDIS_URL"):
        load({"store": "redis"}).store_settings()
    with pytest.raises(OptkitError, match="redis_prefix"):
        load({"store": "redis", "redis_prefix": "a{b}"})


@pytest.mark.parametrize("password", ["ab+/cdPASS=", "S3cr3t#pw", "xyz?y=z/wvu"])
def test_a_malformed_redis_url_never_shows_its_password(password):
    """A base64-style password with '/' (or '#', '?') unencoded: redis-py's error quoted a piece of it as the
    'port' and the URL fallback mask stopped at the '/'."""
    from toolkit.cache.store_redis import connect
    from toolkit.errors import OptkitError

    with pytest.raises(OptkitError, match="bad URL") as err:
        connect(f"redis://:{password}@127.0.0.1:6391/0", "optkit")
    for piece in {password, *password.replace("#", "/").replace("?", "/").split("/")}:
        assert len(piece) < 3 or piece not in str(err.value)
