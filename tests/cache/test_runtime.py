"""The runtime SemanticCache with the real all-MiniLM-L6-v2 embedder: similarity convention, exact layer,
threshold, namespaces, TTL, eviction, faiss HNSW agreement, refusal of a different embedder, cheap import."""

import json
import subprocess
import sys

import numpy as np
import pytest

from toolkit.cache import SemanticCache
from toolkit.cache.runtime import FORMAT, PROBES, SIMILARITY, embed_texts, namespace_key
from toolkit.errors import OptkitError


DEFAULT = namespace_key("default")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def minilm():
    from toolkit.models import load_embedder

    return load_embedder("minilm-l6")


def cosine(embedder, a, b):
    from sentence_transformers.util import cos_sim

    va, vb = embedder.encode([a, b])
    return float(cos_sim(va, vb)[0, 0])


def test_similarity_is_cosine_higher_is_closer(minilm):
    cache = SemanticCache(threshold=-1.0, embedder=minilm)  # serve anything: we look at the similarity only
    cache.insert("how do I reset my password", "Go to Settings > Security.")
    close = cache.lookup("I forgot my password, how can I reset it")
    far = cache.lookup("what's the weather like in Lisbon")
    assert not close.exact and not far.exact
    # The number the cache reports is the library's cosine similarity (sentence-transformers' own cos_sim).
    assert close.similarity == pytest.approx(cosine(minilm, "I forgot my password, how can I reset it",
                                                    "how do I reset my password"), abs=1e-5)
    assert close.similarity > far.similarity
    assert SIMILARITY["higher_is_closer"] and SIMILARITY["kind"] == "cosine"


def test_exact_layer_threshold_and_miss(minilm):
    cache = SemanticCache(threshold=0.7, embedder=minilm)
    cache.insert("Where is my order?", "It ships tomorrow.")
    hit = cache.lookup("  Where is   my order? ")  # whitespace differences only: the exact layer answers
    assert hit.exact and hit.similarity == 1.0 and hit.answer == "It ships tomorrow."
    para = cache.lookup("where's my order")
    assert para is not None and not para.exact and 0.7 <= para.similarity < 1.0
    assert cache.lookup("how do I change my billing address") is None
    strict = SemanticCache(threshold=0.999, embedder=minilm)
    strict.insert("Where is my order?", "x")
    assert strict.lookup("where's my order") is None


def test_exact_only_cache_when_no_threshold_met_the_bound(minilm):
    cache = SemanticCache(threshold=None, embedder=minilm)
    cache.insert("cancel my order", "Done.")
    assert cache.lookup("cancel my order").exact
    assert cache.lookup("please cancel my order") is None


def test_namespaces_are_hard_filters(minilm):
    cache = SemanticCache(threshold=0.5, embedder=minilm)
    cache.insert("what is your refund policy", "30 days.", namespace={"model": "student-v1", "tenant": "acme"})
    assert cache.lookup("what is your refund policy", namespace={"tenant": "acme", "model": "student-v1"}).exact
    assert cache.lookup("what is your refund policy", namespace={"model": "student-v2", "tenant": "acme"}) is None
    assert cache.lookup("what is your refund policy") is None  # default namespace is separate too
    assert len(cache) == 1


def test_ttl_and_max_entries_evict_oldest(minilm):
    clock = Clock()
    cache = SemanticCache(threshold=0.6, embedder=minilm, ttl_s=60, max_entries=2, clock=clock)
    cache.insert("track my package", "A")
    clock.now += 30
    cache.insert("delete my account", "B")
    clock.now += 40  # "track my package" is now 70 s old
    assert cache.lookup("track my package") is None
    assert cache.lookup("delete my account").answer == "B"
    cache.insert("change my password", "C")
    cache.insert("open a new savings account", "D")  # over max_entries=2: the oldest live entry (B) goes
    assert len(cache) == 2
    assert cache.lookup("delete my account") is None
    assert cache.lookup("change my password").answer == "C"
    cache.insert("change my password", "C2")  # same query: the newer answer replaces the old one
    assert cache.lookup("change my password").answer == "C2" and len(cache) == 2


def test_many_evictions_compact_and_stay_correct():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3000, 32)).astype(np.float32)
    cache = SemanticCache(threshold=0.99, max_entries=1000, ann="numpy")
    for start in range(0, 3000, 500):
        cache.insert_many([f"q{i}" for i in range(start, start + 500)], list(range(start, start + 500)),
                          vectors=vecs[start:start + 500])
    assert len(cache) == 1000
    for i in (0, 1999):
        assert cache.lookup_vector(vecs[i]) is None  # evicted
    for i in (2000, 2500, 2999):
        hit = cache.lookup_vector(vecs[i])
        assert hit.answer == i and hit.similarity == pytest.approx(1.0, abs=1e-5)
    assert cache._spaces[namespace_key("default")].size < 3000  # dead rows were reclaimed


def test_faiss_hnsw_agrees_with_numpy():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    base = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = base[:200] + 0.2 * rng.standard_normal((200, 64)).astype(np.float32)
    exact = SemanticCache(threshold=0.5, ann="numpy")
    ann = SemanticCache(threshold=0.5, ann="auto", ann_min_entries=1000)
    for c in (exact, ann):
        c.insert_many([f"q{i}" for i in range(5000)], list(range(5000)), vectors=base)
    assert ann._spaces[DEFAULT].index is not None and exact._spaces[DEFAULT].index is None
    agree = sum(exact.lookup_vector(q).answer == ann.lookup_vector(q).answer for q in queries)
    assert agree >= 195  # HNSW is approximate; with efSearch=64 it should almost never miss here


def test_load_checks_the_embedder(tmp_path, minilm):
    cfg = {"format": FORMAT, "similarity": SIMILARITY, "threshold": 0.8,
           "embedder": {"model": "minilm-l6", "revision": "x", "dim": 384,
                        "probe_vectors": embed_texts(minilm, PROBES).tolist()},
           "runtime": {"ttl_s": None, "max_entries": 10, "ann": "numpy", "ann_min_entries": 10}}
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(cfg))
    cache = SemanticCache.load(path, embedder=minilm)
    assert cache.threshold == 0.8 and cache.max_entries == 10

    from sklearn.feature_extraction.text import HashingVectorizer

    hashing = HashingVectorizer(n_features=384, alternate_sign=False)  # a real, different embedding space
    with pytest.raises(OptkitError, match="differs from 'minilm-l6'"):
        SemanticCache.load(path, embedder=lambda texts: hashing.transform(texts).toarray())
    with pytest.raises(OptkitError, match="dim"):
        SemanticCache.load(path, embedder=lambda texts: np.ones((len(texts), 16)))
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OptkitError, match="not an optkit cache"):
        SemanticCache.load(bad, embedder=minilm)
    with pytest.raises(OptkitError, match="not found"):
        SemanticCache.load(tmp_path / "missing.json", embedder=minilm)


def test_import_pulls_no_heavy_module():
    code = ("import sys, numpy as np\n"
            "from toolkit.cache import SemanticCache\n"
            "c = SemanticCache(threshold=0.9, ann='numpy')\n"
            "v = np.eye(8, dtype=np.float32)\n"
            "c.insert_many([str(i) for i in range(8)], list(range(8)), vectors=v)\n"
            "assert c.lookup_vector(v[3]).answer == 3\n"
            "heavy = [m for m in ('torch', 'sklearn', 'scipy', 'transformers', 'sentence_transformers', "
            "'matplotlib', 'mlflow', 'faiss') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_many_small_namespaces_and_quota_churn_keep_memory_near_the_live_entries():
    """A gateway keys a namespace per tenant, context and parameters: 20k one-entry namespaces held 2 GB of
    preallocated rows (64 each), and a per-namespace quota left up to 1,024 dead rows in every namespace."""
    rng = np.random.default_rng(0)
    dim = 384
    cache = SemanticCache(threshold=0.99, ann="numpy", ttl_s=3600.0)
    for i in range(3000):
        cache.insert_many([f"q{i}"], [i], vectors=rng.standard_normal((1, dim)).astype(np.float32),
                          namespace={"conversation": i})
    held = sum(s.vectors.nbytes for s in cache._spaces.values())
    assert len(cache) == 3000 and held <= 3000 * 4 * dim * 4  # a few rows each, not 64

    churn = SemanticCache(threshold=0.99, ann="numpy", max_entries_per_namespace=5)
    vecs = rng.standard_normal((300, 32)).astype(np.float32)
    for tenant in range(40):
        for i in range(300):
            churn.insert_many([f"t{tenant}-q{i}"], [i], vectors=vecs[i:i + 1], namespace={"tenant": tenant})
    assert len(churn) == 40 * 5
    assert sum(s.size for s in churn._spaces.values()) <= 40 * (5 + 32 + 1)  # dead rows reclaimed as they pile up
    for tenant in (0, 39):  # and the quota kept each tenant's five newest
        hits = [churn.lookup_vector(vecs[i], namespace={"tenant": tenant}) for i in (294, 295, 299)]
        assert [h.answer if h else None for h in hits] == [None, 295, 299]


def test_quota_by_tenant_spans_every_namespace_of_the_tenant():
    """The gateway's namespaces are tenant x conversation context x parameters. Counted per namespace, each of a
    tenant's contexts got a fresh quota, so one tenant's traffic filled max_entries and evicted everyone else's;
    with quota_by="tenant" its inserts evict only its own oldest entries, across its contexts."""
    clock = Clock()
    vecs = np.eye(256, dtype=np.float32)
    victim = {"tenant": "a", "context": "c0"}

    def flood(cache):
        cache.insert_many(["victim q"], ["kept"], vectors=vecs[:1], namespace=victim)
        for i in range(1, 201):
            cache.insert_many([f"q{i}"], [i], vectors=vecs[i:i + 1], namespace={"tenant": "b", "context": f"c{i}"})

    per_namespace = SemanticCache(threshold=0.99, ann="numpy", max_entries=50, max_entries_per_namespace=10)
    flood(per_namespace)
    assert len(per_namespace) == 50 and per_namespace.lookup_vector(vecs[0], victim) is None
    cache = SemanticCache(threshold=0.99, ann="numpy", max_entries=50, max_entries_per_namespace=10,
                          quota_by="tenant", ttl_s=100.0, clock=clock)
    flood(cache)
    assert len(cache) == 11 and cache.lookup_vector(vecs[0], victim).answer == "kept"
    got = [cache.lookup_vector(vecs[i], {"tenant": "b", "context": f"c{i}"}) for i in range(189, 201)]
    assert [h.answer if h else None for h in got] == [None, None] + list(range(191, 201))  # its 10 newest
    clock.now += 101  # expired entries leave the tenant's count: ten fresh ones all stay
    for i in range(201, 211):
        cache.insert_many([f"q{i}"], [i], vectors=vecs[i:i + 1], namespace={"tenant": "b", "context": "new"})
    assert len(cache) == 10 and cache.lookup_vector(vecs[201], {"tenant": "b", "context": "new"}).answer == 201
    with pytest.raises(OptkitError, match="quota_by"):
        SemanticCache(threshold=0.5, quota_by="")


def test_expiry_and_eviction_follow_insertion_order_across_namespaces():
    clock = Clock()
    vecs = np.eye(8, dtype=np.float32)
    cache = SemanticCache(threshold=0.99, ann="numpy", ttl_s=10.0, max_entries=3, clock=clock)
    for i, ns in enumerate(["a", "b", "c"]):
        cache.insert_many([f"q{i}"], [i], vectors=vecs[i:i + 1], namespace=ns)
        clock.now += 1
    cache.insert_many(["q3"], [3], vectors=vecs[3:4], namespace="b")  # full: the oldest (a's) goes
    assert cache.namespaces() == [namespace_key("b"), namespace_key("c")]
    clock.now += 9.5  # now 1012.5: q1 (t=1001) and q2 (t=1002) are past 10 s, q3 (t=1003) is not
    assert len(cache) == 1 and cache.lookup_vector(vecs[3], namespace="b").answer == 3


def test_a_clock_stepped_back_does_not_make_the_newest_entries_look_oldest():
    """Eviction goes by insertion order: ordered by wall-clock time, every insert after an NTP step back evicted
    the insert just before it and kept the stale entries."""
    clock = Clock()
    rng = np.random.default_rng(0)
    cache = SemanticCache(threshold=0.9, ann="numpy", max_entries=5, clock=clock)
    for name in ("old", "new"):
        for i in range(5):
            cache.insert_many([f"{name}{i}"], [f"{name}{i}"], vectors=rng.normal(size=(1, 8)))
            clock.now += 1
        clock.now -= 3600
    space = cache._spaces[DEFAULT]
    assert [space.queries[r] for r in np.nonzero(space.alive[: space.size])[0]] == [f"new{i}" for i in range(5)]
