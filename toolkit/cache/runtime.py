"""The runtime semantic cache: exact-match layer, then nearest neighbour by cosine (or learned) similarity.

Imports numpy only at module level: a serving process pays for the embedder it uses and nothing else
(faiss is imported only when a namespace grows past `ann_min_entries` and ann allows it).

Conventions: similarity = cosine of L2-normalized embeddings, or with learned weights w (cache.json's
similarity.kind diagonal, toolkit/cache/metric.py) sum_i w_i q_i c_i: higher = closer, the same number the tuner
used. Stored vectors stay unit vectors either way; only the query is multiplied by w. A query is served when
its nearest live entry in the same namespace has similarity >= that entry's threshold (the global threshold,
or its cluster's threshold when the config has adaptive clusters).
Namespaces (model + prompt version, tenant, ...) are hard filters: entries of one namespace are never
compared with queries of another, and their keys are canonical and structured (space.namespace_key), so no
namespace value can name another namespace.
"""

from __future__ import annotations

import heapq
import threading
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from toolkit.cache.space import Namespace, Space, namespace_key, quota_key
from toolkit.errors import MissingExtraError, OptkitError

FORMAT = "optkit-cache/1"  # also in cachefile (which imports pydantic, so only load() imports it)
SIMILARITY = {"kind": "cosine", "higher_is_closer": True, "range": [-1.0, 1.0],
              "definition": "dot product of L2-normalized embeddings"}
DIAGONAL_DEFINITION = ("sum_i w_i q_i c_i over L2-normalized embeddings q (query) and c (cached entry), with weights "
                       "w >= 0 learned on the calibration pairs (w = 1 is the cosine)")
# Texts embedded at tuning time and stored in cache.json: a different embedder cannot reproduce them, which is
# how a cache refuses an embedding space it was not built with (names alone cannot catch a swapped directory).
PROBES = ("how do I reset my password", "what is the weather in Paris tomorrow",
          "cancel my order please", "transfer 50 dollars to Anna")
PROBE_MIN_COSINE = 0.99
# cache.json's embedder.embedding = static: the static token vectors (toolkit.route.static) live in this folder
# beside cache.json and load with numpy + tokenizers only (no torch in the serving process).
STATIC_DIR = "cache-embedder"

__all__ = ["Hit", "Namespace", "SemanticCache", "namespace_key"]


@dataclass
class Hit:
    answer: Any
    similarity: float
    exact: bool
    query: str  # the cached query that matched
    namespace: str  # the namespace's canonical key (namespace_key)
    age_s: float


def normalize_text(text: str) -> str:
    """Exact-match key: Unicode NFC and collapsed whitespace (case is kept: it can change meaning)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _unit_rows(x, what: str) -> np.ndarray:
    """Rows of a config matrix as float32 unit vectors; refuses what has no direction (inf, NaN, all zeros).
    Normalized in float64: a float32 norm of large finite values overflows to inf and gives zero rows."""
    with np.errstate(all="ignore"):
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=-1, keepdims=True) if x.ndim == 2 else None
    if norms is None or not np.all(np.isfinite(norms)) or not np.all(norms > 0):
        raise OptkitError(f"{what} must be a matrix of finite, non-zero vectors")
    return (x / norms).astype(np.float32)


def embed_texts(embedder: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings of texts, L2-normalized, float32 [n, dim], from a sentence-transformers model or a callable."""
    if hasattr(embedder, "encode"):
        vecs = embedder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
    elif callable(embedder):
        vecs = embedder(list(texts))
    else:
        raise TypeError("embedder must have .encode(texts) or be callable(texts) -> array")
    return l2_normalize(np.asarray(vecs))


def similarity_spec(weights: Optional[np.ndarray] = None) -> dict:
    """cache.json's `similarity`: the cosine, or the learned diagonal metric with its weights (exact float32
    values, so a reloaded cache scores exactly as the tuner did)."""
    if weights is None:
        return dict(SIMILARITY)
    w = [float(x) for x in np.asarray(weights, np.float32)]
    return {"kind": "diagonal", "higher_is_closer": True, "range": [-max(w), max(w)],
            "definition": DIAGONAL_DEFINITION, "weights": w}


def _check_weights(weights) -> Optional[np.ndarray]:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or (w < 0).any() or w.max() <= 0:
        raise OptkitError("cache similarity weights must be a non-empty vector of finite values >= 0, not all zero")
    return w


def _check_settings(threshold, ttl_s, max_entries, max_entries_per_namespace, ann, ann_min_entries,
                    weights: Optional[np.ndarray]) -> None:
    """The constructor's own guard (cache.json is validated in full by cachefile before it gets here)."""
    limit = 1.0 if weights is None else float(weights.max())  # |score| of unit vectors never exceeds it
    if threshold is not None and not (isinstance(threshold, (int, float)) and -limit <= threshold <= limit):
        what = "a cosine similarity in [-1, 1]" if weights is None else f"a similarity in [-{limit:g}, {limit:g}]"
        raise OptkitError(f"cache threshold must be {what} or None, got {threshold!r}")
    if ttl_s is not None and not (isinstance(ttl_s, (int, float)) and 0 < ttl_s < float("inf")):
        raise OptkitError(f"cache ttl_s must be a finite number of seconds > 0 or None, got {ttl_s!r}")
    for name, value in (("max_entries", max_entries), ("ann_min_entries", ann_min_entries),
                        ("max_entries_per_namespace", max_entries_per_namespace)):
        if value is None and name == "max_entries_per_namespace":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptkitError(f"cache {name} must be an integer >= 1, got {value!r}")
    if ann not in ("auto", "numpy", "faiss"):
        raise OptkitError(f"cache ann must be auto, numpy or faiss, got '{ann}'")


class SemanticCache:
    """Exact-match layer in front of a nearest-neighbour cache with a tuned similarity threshold.

    Thread-safe: every read and write of the entries happens under one lock, so any number of threads may call
    lookup / insert / len at once (a gateway's worker threads, or asyncio tasks via `asyncio.to_thread`). The
    embedder runs outside the lock, so threads embed in parallel and only the index work is serialized. Nothing
    is shared across processes: each process holds its own entries (a multi-process gateway has one cache per
    worker; a hit in one worker does not make a hit in another) -- unless it is the Redis-backed subclass
    (`load(..., store="redis")`, toolkit/cache/store_redis.py), which every replica shares.
    """

    def __init__(self, threshold: Optional[float], embedder: Any = None, *, ttl_s: Optional[float] = None,
                 max_entries: int = 100_000, max_entries_per_namespace: Optional[int] = None,
                 quota_by: Optional[str] = None, ann: str = "auto",
                 ann_min_entries: int = 20_000, centroids: Optional[np.ndarray] = None,
                 cluster_thresholds: Optional[Sequence] = None, config: Optional[dict] = None,
                 weights: Optional[Sequence[float]] = None, query_gate: Any = None,
                 clock: Callable[[], float] = time.time):
        weights = _check_weights(weights)
        _check_settings(threshold, ttl_s, max_entries, max_entries_per_namespace, ann, ann_min_entries, weights)
        if quota_by is not None and not (isinstance(quota_by, str) and quota_by):
            raise OptkitError(f"cache quota_by must be a namespace field name or None, got {quota_by!r}")
        self.weights = weights  # None = cosine; else the learned diagonal metric (applied to the query)
        self.threshold = None if threshold is None else float(threshold)  # None = exact matches only
        self.embedder = embedder
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # The quota: inserts beyond it evict the oldest entry of the same quota key -- the namespace, or with
        # quota_by the namespace's field of that name (the gateway: "tenant", across its contexts and models), so
        # one tenant's traffic can evict only its own entries.
        self.max_entries_per_namespace = max_entries_per_namespace
        self.quota_by = quota_by
        self.ann = ann
        self.ann_min_entries = ann_min_entries
        self.centroids = None if centroids is None else _unit_rows(centroids, "cache config: centroids")
        # A cluster threshold of None = that cluster never serves semantic hits.
        self.cluster_thresholds = (None if cluster_thresholds is None else
                                   np.array([np.inf if t is None else t for t in cluster_thresholds], np.float64))
        if self.centroids is not None and len(self.centroids) != len(self.cluster_thresholds):
            raise OptkitError("cache config: centroids and cluster thresholds differ in length")
        # cache.adaptive: query (toolkit/cache/local.py Gate): each query's own threshold, from its neighbourhood
        # among the calibration queries; replaces the global / cluster threshold when set.
        self.query_gate = query_gate
        self.config = config or {}
        self.clock = clock
        self._lock = threading.RLock()
        self._spaces: dict[str, Space] = {}  # only namespaces with live entries
        # (seq, created, namespace) of every entry in insertion order: expiry and eviction pop from here instead
        # of visiting every namespace on every insert (O(namespaces) under the lock: quadratic as namespaces
        # grew). By seq, not time: a clock stepped back must not make the newest entries look oldest (expiry then
        # waits for the older ones in front, as it did per namespace). Entries killed otherwise stay until popped,
        # or until a rebuild when they outnumber the live ones.
        self._order: list[tuple[int, float, str]] = []
        self._live = 0
        # per quota key: live entries, and (seq, namespace) in insertion order (dead ones skipped when popped)
        self._quota_live: dict[str, int] = {}
        self._quota_order: dict[str, deque] = {}
        self._quota_of: dict[str, str] = {}  # namespace -> its quota key, while it holds entries
        self._seq = 0
        self._faiss = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Union[str, Path], embedder: Any = None, *, store: str = "memory",
             redis_url: Optional[str] = None, redis_prefix: str = "optkit", **overrides) -> "SemanticCache":
        """A cache configured by a `cache.json` written by the cache stage.

        The file is validated in full first (toolkit/cache/cachefile.py: ranges, finiteness, lengths; one
        OptkitError line naming the field). `embedder`: None (load the model the config names), a model
        reference, or a loaded model / callable. Whatever it is must reproduce the probe embeddings stored in the
        config; a different embedding space is refused, because its similarities would be judged against a
        threshold tuned for another space. `overrides`: runtime settings (ttl_s, max_entries,
        max_entries_per_namespace, quota_by, ann, ann_min_entries) and clock. `store`: memory (this process) or redis
        (entries shared by every process using `redis_url` + `redis_prefix`: toolkit/cache/store_redis.py).
        """
        from toolkit.cache import cachefile

        if store not in ("memory", "redis"):
            raise OptkitError(f"cache store must be memory or redis, got '{store}'")
        path = Path(path)
        spec = cachefile.read(path)
        clock = overrides.pop("clock", time.time)
        runtime = cachefile.runtime_settings(spec, overrides, str(path))
        cfg = spec.model_dump()
        if embedder is None and cfg["embedder"].get("embedding") == "static":
            embedder = load_static_embedder(path.parent / cfg["embedder"].get("files", STATIC_DIR), str(path))
        elif embedder is None or isinstance(embedder, (str, Path)):
            from toolkit.models import load_embedder

            embedder = load_embedder(str(embedder or spec.embedder.model))
        check_embedder(embedder, cfg["embedder"], source=str(path))
        clusters = spec.adaptive if spec.adaptive is not None and spec.adaptive.exported else None
        gate = None
        if spec.query_threshold is not None:  # cache.adaptive: query; its reference file lies beside cache.json
            from toolkit.cache import local

            gate = local.from_spec(spec.query_threshold, path.parent, spec.embedder.dim, str(path))
        parts = {"config": cfg, "weights": spec.similarity.weights, "query_gate": gate,
                 "centroids": _unit_rows(clusters.centroids, f"{path}: adaptive.centroids") if clusters else None,
                 "cluster_thresholds": clusters.thresholds if clusters else None}
        if store == "redis":  # imported only here: the memory store never loads the redis client
            from toolkit.cache.store_redis import RedisSemanticCache

            return RedisSemanticCache(spec.threshold, embedder, **runtime.model_dump(), url=redis_url,
                                      prefix=redis_prefix, **parts)
        return cls(spec.threshold, embedder, **runtime.model_dump(), **parts, clock=clock)

    # ------------------------------------------------------------------ public API

    def lookup(self, query: str, namespace: Namespace = "default", exact: bool = True) -> Optional[Hit]:
        """The cached answer for `query` in `namespace`, or None (a miss). exact=False: the semantic layer alone
        (the gateway's decision path has its own, shareable exact layer in front: toolkit/cache/exact.py)."""
        ns = namespace_key(namespace)
        with self._lock:
            space = self._fresh_space(ns)
            if space is None:
                return None
            row = space.exact.get(normalize_text(query)) if exact else None
            if row is not None:
                return self._hit(space, ns, row, 1.0, exact=True)
        if self.threshold is None and self.cluster_thresholds is None and self.query_gate is None:
            return None  # no semantic threshold met the bound: exact matches only
        return self._lookup_key(self._embed([query])[0], ns)

    def lookup_vector(self, vec: np.ndarray, namespace: Namespace = "default") -> Optional[Hit]:
        """The semantic layer alone, for an already-embedded query (normalized and weighted here, as tuned)."""
        return self._lookup_key(vec, namespace_key(namespace))

    def insert(self, query: str, answer: Any, namespace: Namespace = "default") -> None:
        self.insert_many([query], [answer], namespace)

    def insert_many(self, queries: Sequence[str], answers: Sequence[Any], namespace: Namespace = "default",
                    vectors: Optional[np.ndarray] = None) -> None:
        """Insert several entries (embedded in one batch, outside the lock, unless `vectors` are given)."""
        if len(queries) != len(answers):
            raise OptkitError("cache insert: queries and answers differ in length")
        if not len(queries):
            return
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise OptkitError("cache insert: a query must be a non-empty string")
        ns, group = namespace_key(namespace), quota_key(namespace, self.quota_by)
        vecs = self._embed(queries) if vectors is None else l2_normalize(vectors)
        if vecs.ndim != 2 or len(vecs) != len(queries):
            raise OptkitError(f"cache insert: {len(queries)} queries but vectors of shape {vecs.shape}")
        self._store(ns, [normalize_text(q) for q in queries], list(answers), vecs, self._clusters_of(vecs), group)

    def _store(self, ns: str, keys: list, answers: list, vecs: np.ndarray, clusters: np.ndarray,
               group: str) -> None:
        """The store seam: entries live in this process (store_redis.RedisSemanticCache keeps them in Redis).
        `group`: the quota key (space.quota_key)."""
        with self._lock:
            self._expire_all()
            space = self._spaces.get(ns)
            if space is not None and vecs.shape[1] != space.dim:
                raise OptkitError(f"cache insert: embedding dim {vecs.shape[1]} != {space.dim}")
            for key, a, v, c in zip(keys, answers, vecs, clusters):
                space = self._insert_one(ns, key, a, v, int(c), group)
            self._maybe_index(space)

    def __len__(self) -> int:
        with self._lock:
            self._expire_all()
            return self._live

    def namespaces(self) -> list[str]:
        """Canonical keys (namespace_key) of the namespaces that hold live entries."""
        with self._lock:
            self._expire_all()
            return list(self._spaces)

    # ------------------------------------------------------------------ internals (caller holds the lock)

    def _lookup_key(self, vec: np.ndarray, ns: str) -> Optional[Hit]:
        vec = l2_normalize(vec)
        gate_part = None
        if self.query_gate is not None:  # from the unit vector, as calibrated; outside the lock (a mat-vec)
            if vec.shape != self.query_gate.ref_vecs.shape[1:]:
                raise OptkitError(f"cache lookup: embedding dim {vec.shape[-1]} != the query threshold's "
                                  f"{self.query_gate.ref_vecs.shape[1]}")
            gate_part = self.query_gate.query_part(vec[None])
        if self.weights is not None:  # entries stay unit vectors: the query carries the metric
            if vec.shape != self.weights.shape:
                raise OptkitError(f"cache lookup: embedding dim {vec.shape[-1]} != the metric's {len(self.weights)}")
            vec = vec * self.weights
        with self._lock:
            space = self._fresh_space(ns)
            if space is None:
                return None
            row, sim = space.nearest(vec)
            if row < 0:
                return None
            if gate_part is None:
                return self._hit(space, ns, row, sim, exact=False) if sim >= self._threshold_of(space, row) else None
            # The candidate and its entry's unit vector are read together, as one snapshot, under the lock (eviction
            # frees a row's payload, compaction reclaims rows); the gate's entry part, a mat-vec against the
            # reference set, then runs outside it.
            hit, entry = self._hit(space, ns, row, sim, exact=False), space.vectors[row].copy()
        return hit if sim >= float(self.query_gate.finish(gate_part, entry[None])[0]) else None

    def _insert_one(self, ns: str, key: str, answer: Any, vec: np.ndarray, cluster: int, group: str) -> Space:
        space = self._spaces.get(ns)
        if space is not None and key in space.exact:  # a newer answer for the same query replaces the old one
            self._kill(ns, space, space.exact[key])
        quota = self.max_entries_per_namespace
        while quota is not None and self._quota_live.get(group, 0) >= quota:
            seq, owner = self._quota_order[group].popleft()  # only this quota key's own entries
            self._kill_entry(seq, owner)
        while self._live >= self.max_entries:
            self._evict_oldest()
        space = self._spaces.get(ns) or self._open_space(ns, len(vec), group)
        self._seq += 1
        self._added(ns, space, space.add(vec, key, answer, self.clock(), cluster, self._seq))
        return space

    def _open_space(self, ns: str, dim: int, group: str) -> Space:
        if self.max_entries_per_namespace is not None:  # quota bookkeeping only when there is a quota
            self._quota_of[ns] = group
        space = self._spaces[ns] = Space(dim)
        return space

    def _added(self, ns: str, space: Space, row: int) -> None:
        self._live += 1
        heapq.heappush(self._order, (int(space.seq[row]), float(space.created[row]), ns))
        if len(self._order) > 2 * self._live + 1024:
            self._order = [(int(s.seq[r]), float(s.created[r]), n) for n, s in self._spaces.items()
                           for r in np.nonzero(s.alive[: s.size])[0]]
            heapq.heapify(self._order)
        group = self._quota_of.get(ns)
        if group is None:
            return
        self._quota_live[group] = self._quota_live.get(group, 0) + 1
        order = self._quota_order.setdefault(group, deque())
        order.append((int(space.seq[row]), ns))
        if len(order) > 2 * self._quota_live[group] + 64:  # entries expired or evicted elsewhere: drop them
            self._quota_order[group] = deque(e for e in order if self._row_of(*e) >= 0)

    def _row_of(self, seq: int, ns: str) -> int:
        space = self._spaces.get(ns)
        return -1 if space is None else space.row_of(seq)

    def _kill(self, ns: str, space: Space, row: int) -> None:
        if space.kill(row):
            self._live -= 1
            self._gone(ns, 1)
        self._tidy(ns, space)

    def _gone(self, ns: str, n: int) -> None:
        """n entries of namespace ns died: its quota key counts them out."""
        group = self._quota_of.get(ns)
        if group is None:
            return
        self._quota_live[group] -= n
        if self._quota_live[group] <= 0:
            del self._quota_live[group], self._quota_order[group]

    def _tidy(self, ns: str, space: Space) -> None:
        """Drop an empty namespace; compact one whose rows are mostly dead (bounded memory and scan time)."""
        if self._spaces.get(ns) is not space:
            return
        if space.live == 0:
            del self._spaces[ns]
            self._quota_of.pop(ns, None)
        elif space.sparse():
            self._spaces[ns] = space.compacted()
            self._maybe_index(self._spaces[ns])

    def _fresh_space(self, ns: str) -> Optional[Space]:
        """The namespace's space with its expired entries dropped; None when it holds nothing."""
        space = self._spaces.get(ns)
        if space is not None and self.ttl_s is not None:
            expired = space.expire(self.clock() - self.ttl_s)
            if expired:
                self._live -= expired
                self._gone(ns, expired)
            self._tidy(ns, space)
            space = self._spaces.get(ns)
        return space

    def _expire_all(self) -> None:
        if self.ttl_s is None:
            return
        limit = self.clock() - self.ttl_s
        while self._order and self._order[0][1] <= limit:
            seq, _, ns = heapq.heappop(self._order)
            self._kill_entry(seq, ns)

    def _evict_oldest(self) -> None:
        """Evict the oldest live entry of any namespace (the first inserted)."""
        while self._order:
            seq, _, ns = heapq.heappop(self._order)
            if self._kill_entry(seq, ns):
                return
        raise RuntimeError("cache bookkeeping: live count above zero but no live entry")  # a bug, not input

    def _kill_entry(self, seq: int, ns: str) -> bool:
        """Kill the entry with this insertion number if it is still live; whether it was."""
        row = self._row_of(seq, ns)
        if row < 0:
            return False
        self._kill(ns, self._spaces[ns], row)
        return True

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None:
            raise OptkitError("this SemanticCache has no embedder: pass one, or use lookup_vector/insert_many"
                              "(vectors=...)")
        return embed_texts(self.embedder, texts)

    def _clusters_of(self, vecs: np.ndarray) -> np.ndarray:
        if self.centroids is None:
            return np.zeros(len(vecs), np.int32)
        return np.argmax(vecs @ self.centroids.T, axis=1).astype(np.int32)

    def _threshold_of(self, space: Space, row: int) -> float:
        if self.cluster_thresholds is not None:
            return float(self.cluster_thresholds[space.cluster[row]])
        return float("inf") if self.threshold is None else self.threshold

    def _hit(self, space: Space, ns: str, row: int, sim: float, exact: bool) -> Hit:
        return Hit(space.answers[row], float(sim), exact, space.queries[row], ns,
                   self.clock() - float(space.created[row]))

    def _maybe_index(self, space: Optional[Space]) -> None:
        if space is None or space.index is not None or self.ann == "numpy":
            return
        if self.ann == "auto" and space.live < self.ann_min_entries:
            return
        faiss = self._faiss_module()
        if faiss is not None:
            space.build_index(faiss)

    def _faiss_module(self):
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                if self.ann == "faiss":
                    raise MissingExtraError("cache ann=faiss", "faiss-cpu", "faiss") from None
                self._faiss = False  # auto: stay on exact numpy search
                return None
            self._faiss = faiss
        return self._faiss or None


def load_static_embedder(directory: Path, source: str = "cache.json"):
    """The static embedder a cache was tuned with (numpy + tokenizers; the router's own class)."""
    from toolkit.route.runtime import StaticEmbedder

    if not (directory / StaticEmbedder.VECTORS).is_file() or not (directory / StaticEmbedder.TOKENIZER).is_file():
        raise OptkitError(f"{source}: embedding static needs {directory}/{StaticEmbedder.VECTORS} and "
                          f"{StaticEmbedder.TOKENIZER} (written by the cache stage next to cache.json)")
    return StaticEmbedder(directory)


def probe_vectors(embedder: Any) -> np.ndarray:
    return embed_texts(embedder, PROBES)


def check_embedder(embedder: Any, recorded: dict, source: str = "cache.json") -> None:
    """Refuse an embedder whose space differs from the one the threshold was tuned in."""
    with np.errstate(all="ignore"):  # a damaged probe like 1e308 becomes inf here and refuses below
        want = np.asarray(recorded["probe_vectors"], dtype=np.float32)
    got = probe_vectors(embedder)
    if got.shape != want.shape:
        raise OptkitError(f"{source}: the embedder gives {got.shape[1]}-dim vectors but the cache was tuned with "
                          f"'{recorded['model']}' ({want.shape[1]}-dim); load it with that embedder")
    with np.errstate(all="ignore"):  # a probe like 1e308 overflows float32: NaN must refuse, not pass
        cos = float(np.min(np.sum(got * l2_normalize(want), axis=1)))
    if not cos >= PROBE_MIN_COSINE:
        raise OptkitError(f"{source}: the embedder differs from '{recorded['model']}' "
                          f"({recorded.get('revision')}) that the threshold was tuned with (probe cosine {cos:.3f}); "
                          "mixing embedding spaces breaks the cache: load it with the same embedder")
