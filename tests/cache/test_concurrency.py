"""SemanticCache under concurrent readers and writers (what a gateway's worker threads do), and namespaces that no
value can forge: canonical structured keys, property-tested, and per-namespace quotas."""

import sys
import threading
import time

import numpy as np
import pytest

from toolkit.cache import SemanticCache
from toolkit.cache.runtime import namespace_key
from toolkit.errors import OptkitError

DIM = 32


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def check_consistent(cache: SemanticCache, vecs: np.ndarray) -> None:
    """Bookkeeping agrees with the entries, and every live entry is found by its own vector with its own answer."""
    tenant_of = {namespace_key({"tenant": t}): t for t in range(3)}
    live = 0
    for ns, space in cache._spaces.items():
        alive = np.nonzero(space.alive[: space.size])[0]
        assert space.live == len(alive)
        live += len(alive)
        for q, row in space.exact.items():
            assert space.alive[row] and space.queries[row] == q
        for row in alive:
            q = space.queries[row]
            assert space.answers[row] == "a" + q[1:]
            hit = cache.lookup_vector(vecs[int(q[1:])], {"tenant": tenant_of[ns]})
            assert hit is not None and hit.answer == "a" + q[1:]
    assert cache._live == live == len(cache) and 0 <= live <= cache.max_entries


def run_threads(worker, n: int) -> list[str]:
    """worker(seed) for seeds 0..n-1, in threads switched as often as possible (races show up in seconds, not
    hours); the exceptions they raised, as reprs."""
    errors = []

    def guarded(seed: int):
        try:
            worker(seed)
        except Exception as exc:  # noqa: BLE001 - any exception in a thread is the failure we look for
            errors.append(repr(exc))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=guarded, args=(s,)) for s in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return errors


def test_eight_threads_insert_lookup_and_evict_without_corruption():
    """8 threads insert, look up, count and (through TTL and max_entries) expire, evict and compact at once.
    Before the lock: IndexError storms, hits with answer None, a negative or wrong len(), more live entries than
    max_entries."""
    vecs = unit_vectors(3000)
    frozen = []  # the check below runs on a stopped clock: entries expiring while it counts are not a race
    cache = SemanticCache(threshold=0.99, ann="numpy", max_entries=1500, ttl_s=0.5,
                          clock=lambda: frozen[0] if frozen else time.time())
    wrong = []
    stop = time.monotonic() + 4.0

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            ns = {"tenant": int(rng.integers(3))}
            idx = rng.integers(0, len(vecs), int(rng.integers(1, 40)))
            cache.insert_many([f"q{i}" for i in idx], [f"a{i}" for i in idx], ns, vectors=vecs[idx])
            for i in rng.integers(0, len(vecs), 20):
                hit = cache.lookup_vector(vecs[i], ns)
                if hit is not None and (hit.answer != f"a{i}" or hit.query != f"q{i}"):
                    wrong.append((i, hit.query, hit.answer))
            n = len(cache)
            if not 0 <= n <= cache.max_entries:
                wrong.append(("len", n))

    errors = run_threads(worker, 8)
    assert errors == [] and wrong == []
    frozen.append(time.time())
    check_consistent(cache, vecs)


def test_a_gate_reading_the_entry_judges_every_hit_by_that_entry_under_eviction():
    """cache.query_entry: the threshold depends on the nearest entry's vector, which the runtime reads under the
    lock and gates outside it while writers insert, evict and compact. Every hit served must carry that entry's own
    answer and similarity and clear the threshold of that very entry."""
    from toolkit.cache.local import FEATURES, Gate

    vecs, ref = unit_vectors(400, seed=2), unit_vectors(300, seed=3)
    slopes = np.zeros(len(FEATURES))
    slopes[-2:] = 1.0  # the entry's crowding moves the threshold a lot; the query's features not at all
    probe = Gate(0.0, slopes, ref, np.ones(len(ref), np.int64), support=-1.0, fallback=None, entry=True)
    offset = 0.95 - float(np.median(probe.thresholds(vecs, vecs)))  # about half the near-copy lookups pass
    gate = Gate(offset, slopes, ref, np.ones(len(ref), np.int64), support=-1.0, fallback=None, entry=True)
    cache = SemanticCache(threshold=0.9, ann="numpy", max_entries=40, query_gate=gate)  # evicts and compacts constantly
    wrong, served = [], []
    stop = time.monotonic() + 30.0  # a cap: the threads stop once 200 hits were served (a few seconds)

    def worker(seed: int):
        r = np.random.default_rng(seed)
        while time.monotonic() < stop and len(served) < 200:
            idx = r.integers(0, len(vecs), 8)
            cache.insert_many([f"q{i}" for i in idx], [f"a{i}" for i in idx], vectors=vecs[idx])
            for i in r.integers(0, len(vecs), 8):
                q = vecs[i] + 0.05 * r.standard_normal(DIM).astype(np.float32)
                q /= np.linalg.norm(q)
                hit = cache.lookup_vector(q)
                if hit is None:
                    continue
                j = int(hit.query[1:])
                want = float(gate.thresholds(q[None], vecs[j][None])[0])
                if hit.answer != f"a{j}" or abs(hit.similarity - float(q @ vecs[j])) > 1e-5 or \
                        hit.similarity < want - 1e-6:
                    wrong.append((i, hit.query, hit.similarity, want))
                served.append(j == i)

    errors = run_threads(worker, 6)
    assert errors == [] and wrong == []
    assert len(served) > 50 and np.mean(served) > 0.5  # the gate did serve, mostly the looked-up entry itself


# ------------------------------------------------------------------------------------------- namespaces


ALPHABET = list('ab1=|,:;"[]{}\\ \t\x00é') + ["None", "true", "1.0", "tenant=acme", "default"]


def random_namespace(rng):
    """Arbitrary namespaces built from the characters and tokens that forge keys in a naive encoding."""
    def text():
        return "".join(rng.choice(ALPHABET) for _ in range(int(rng.integers(0, 4))))

    def scalar():
        kind = int(rng.integers(6))
        return [text, lambda: int(rng.integers(-2, 3)), lambda: bool(rng.integers(2)), lambda: None,
                lambda: float(rng.choice([0.0, -0.0, 1.0, 0.5, 1e-300])), lambda: str(int(rng.integers(-2, 3)))][kind]()

    if rng.random() < 0.3:
        return text()
    return {text(): scalar() for _ in range(int(rng.integers(0, 4)))}


def same(a, b) -> bool:
    """Equal value for value and type for type (1 == 1.0 == True in Python, but not as namespaces)."""
    if isinstance(a, str) or isinstance(b, str):
        return type(a) is type(b) and a == b
    return sorted(a) == sorted(b) and all(type(a[k]) is type(b[k]) and repr(a[k]) == repr(b[k]) for k in a)


def near_copy(ns):
    """A namespace that a naive key would confuse with `ns`: a value as its string, or one more separator."""
    if isinstance(ns, str):
        return ns + "|"
    if not ns:
        return {"": None}
    k = next(iter(ns))
    return {**ns, k: str(ns[k]) if not isinstance(ns[k], str) else ns[k] + "|"}


def test_no_hit_across_namespaces():
    """Property over 3,000 random pairs of namespaces (plus each namespace against a near copy of itself): a hit
    from another namespace is impossible by construction, equal keys only for identical namespaces."""
    rng = np.random.default_rng(0)
    v = unit_vectors(2)
    pairs = [(random_namespace(rng), random_namespace(rng)) for _ in range(1500)]
    pairs += [(a, near_copy(a)) for a, _ in pairs]
    pairs += [(a, a) for a, _ in pairs[:200]]
    for a, b in pairs:
        assert (namespace_key(a) == namespace_key(b)) == same(a, b), (a, b)
        cache = SemanticCache(threshold=-1.0, ann="numpy")  # serves anything within a namespace
        cache.insert_many(["what is my balance"], ["A's answer"], a, vectors=v[:1])
        hit = cache.lookup_vector(v[1], b)
        assert (hit is not None) == same(a, b), (a, b)
        assert hit is None or hit.answer == "A's answer"


@pytest.mark.parametrize("a, b", [("tenant=acme", {"tenant": "acme"}), ({"a": "1|b=2"}, {"a": "1", "b": "2"}),
                                  ({"t": 1}, {"t": "1"}), ({"t": True}, {"t": 1}), ({"t": None}, {"t": "None"}),
                                  ('{"a": 1}', {"a": 1}), ("default", {"default": None})])
def test_reported_collisions_are_separate_namespaces(a, b):
    cache = SemanticCache(threshold=0.5, ann="numpy")
    cache.insert_many(["refund policy"], ["30 days"], a, vectors=unit_vectors(1))
    assert cache.lookup_vector(unit_vectors(1)[0], b) is None
    assert cache.lookup_vector(unit_vectors(1)[0], a).answer == "30 days"


def test_namespace_values_must_be_plain_data():
    cache = SemanticCache(threshold=0.5, ann="numpy")
    for bad in ({"t": object()}, {"t": float("nan")}, {1: "a"}, ["tenant"], {"t": [1, 2]}):
        with pytest.raises(OptkitError, match="namespace"):
            cache.insert_many(["q"], ["a"], bad, vectors=unit_vectors(1))


def test_per_namespace_quota_keeps_other_tenants_entries():
    """One tenant's inserts evict only its own entries (before: max_entries was global, one tenant flushed all)."""
    vecs = unit_vectors(600)
    cache = SemanticCache(threshold=0.99, ann="numpy", max_entries=1000, max_entries_per_namespace=100)
    cache.insert_many([f"q{i}" for i in range(100)], [f"a{i}" for i in range(100)], {"tenant": "quiet"},
                      vectors=vecs[:100])
    for start in range(100, 600, 50):  # a noisy tenant inserts 500 entries
        idx = range(start, start + 50)
        cache.insert_many([f"q{i}" for i in idx], [f"a{i}" for i in idx], {"tenant": "noisy"},
                          vectors=vecs[start:start + 50])
    assert all(cache.lookup_vector(vecs[i], {"tenant": "quiet"}).answer == f"a{i}" for i in range(100))
    noisy = [i for i in range(100, 600) if cache.lookup_vector(vecs[i], {"tenant": "noisy"}) is not None]
    assert noisy == list(range(500, 600))  # its own 100 newest
    assert len(cache) == 200
    with pytest.raises(OptkitError, match="max_entries_per_namespace"):
        SemanticCache(threshold=0.5, max_entries_per_namespace=0)
