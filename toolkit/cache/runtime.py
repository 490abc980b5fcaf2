"""The runtime semantic cache: exact-match layer, then nearest neighbour by cosine similarity.

Imports numpy only at module level: a serving process pays for the embedder it uses and nothing else
(faiss is imported only when a namespace grows past `ann_min_entries` and ann allows it).

Conventions: similarity = cosine of L2-normalized embeddings, higher = closer, the same number the tuner
used. A query is served when its nearest live entry in the same namespace has similarity >= that entry's
threshold (the global threshold, or its cluster's threshold when the config has adaptive clusters).
Namespaces (model + prompt version, tenant, ...) are hard filters: entries of one namespace are never
compared with queries of another.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from toolkit.errors import MissingExtraError, OptkitError

FORMAT = "optkit-cache/1"
SIMILARITY = {"kind": "cosine", "higher_is_closer": True, "range": [-1.0, 1.0],
              "definition": "dot product of L2-normalized embeddings"}
# Texts embedded at tuning time and stored in cache.json: a different embedder cannot reproduce them, which is
# how a cache refuses an embedding space it was not built with (names alone cannot catch a swapped directory).
PROBES = ("how do I reset my password", "what is the weather in Paris tomorrow",
          "cancel my order please", "transfer 50 dollars to Anna")
PROBE_MIN_COSINE = 0.99

Namespace = Union[str, Mapping[str, Any]]


@dataclass
class Hit:
    answer: Any
    similarity: float
    exact: bool
    query: str  # the cached query that matched
    namespace: str
    age_s: float


def namespace_key(ns: Namespace) -> str:
    """'default', or a mapping like {'model': 'student-v2', 'prompt': 'v3', 'tenant': 'acme'} -> stable key."""
    if isinstance(ns, str):
        return ns
    if isinstance(ns, Mapping):
        return "|".join(f"{k}={ns[k]}" for k in sorted(ns))
    raise TypeError(f"namespace must be a str or a mapping, got {type(ns).__name__}")


def normalize_text(text: str) -> str:
    """Exact-match key: Unicode NFC and collapsed whitespace (case is kept: it can change meaning)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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


class _Space:
    """The entries of one namespace: vectors in a growable matrix, plus an optional faiss HNSW index."""

    def __init__(self, dim: int):
        self.vectors = np.zeros((64, dim), dtype=np.float32)
        self.alive = np.zeros(64, dtype=bool)
        self.created = np.zeros(64, dtype=np.float64)
        self.cluster = np.zeros(64, dtype=np.int32)
        self.queries: list[str] = []
        self.answers: list[Any] = []
        self.exact: dict[str, int] = {}
        self.size = 0  # rows used (live and dead)
        self.live = 0
        self.index = None  # faiss index over rows [0, indexed)
        self.indexed = 0

    def add(self, vec: np.ndarray, query: str, answer: Any, created: float, cluster: int) -> int:
        if self.size == len(self.alive):  # grow by doubling: amortized O(1) inserts
            grow = len(self.alive)
            self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors[:grow])])
            self.alive = np.concatenate([self.alive, np.zeros(grow, bool)])
            self.created = np.concatenate([self.created, np.zeros(grow)])
            self.cluster = np.concatenate([self.cluster, np.zeros(grow, np.int32)])
        row = self.size
        self.vectors[row], self.alive[row], self.created[row], self.cluster[row] = vec, True, created, cluster
        self.queries.append(query)
        self.answers.append(answer)
        self.size += 1
        self.live += 1
        return row

    def kill(self, row: int) -> None:
        if self.alive[row]:
            self.alive[row] = False
            self.live -= 1
            key = self.queries[row]
            if self.exact.get(key) == row:
                del self.exact[key]
            self.answers[row] = None  # free the payload now; the row is reclaimed at the next compaction

    def nearest(self, vec: np.ndarray) -> tuple[int, float]:
        """(row, similarity) of the closest live entry; (-1, -inf) when there is none."""
        if self.live == 0:
            return -1, float("-inf")
        if self.index is not None:
            found = self._nearest_ann(vec)
            if found is not None:
                return found
        sims = self.vectors[: self.size] @ vec
        sims[~self.alive[: self.size]] = -np.inf
        row = int(np.argmax(sims))
        return row, float(sims[row])

    def _nearest_ann(self, vec: np.ndarray) -> Optional[tuple[int, float]]:
        self._sync_index()
        k = 16
        while True:
            sims, rows = self.index.search(vec[None, :], min(k, self.indexed))
            for s, r in zip(sims[0], rows[0]):
                if r >= 0 and self.alive[r]:
                    return int(r), float(s)
            if k >= self.indexed:
                return None
            k *= 4  # many dead rows near the query: widen the search

    def _sync_index(self) -> None:
        if self.indexed < self.size:
            self.index.add(self.vectors[self.indexed: self.size])
            self.indexed = self.size

    def build_index(self, faiss_module) -> None:
        index = faiss_module.IndexHNSWFlat(self.vectors.shape[1], 32, faiss_module.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
        self.index, self.indexed = index, 0
        self._sync_index()

    def compacted(self) -> tuple["_Space", dict[int, int]]:
        """A copy with dead rows dropped, and the old-row -> new-row map."""
        new = _Space(self.vectors.shape[1])
        mapping = {}
        for row in np.nonzero(self.alive[: self.size])[0]:
            mapping[int(row)] = new.add(self.vectors[row], self.queries[row], self.answers[row],
                                        float(self.created[row]), int(self.cluster[row]))
        new.exact = {q: mapping[r] for q, r in self.exact.items() if r in mapping}
        return new, mapping


class SemanticCache:
    """Exact-match layer in front of a nearest-neighbour cache with a tuned similarity threshold."""

    def __init__(self, threshold: Optional[float], embedder: Any = None, *, ttl_s: Optional[float] = None,
                 max_entries: int = 100_000, ann: str = "auto", ann_min_entries: int = 20_000,
                 centroids: Optional[np.ndarray] = None, cluster_thresholds: Optional[Sequence] = None,
                 config: Optional[dict] = None, clock: Callable[[], float] = time.time):
        if ann not in ("auto", "numpy", "faiss"):
            raise OptkitError(f"cache ann must be auto, numpy or faiss, got '{ann}'")
        if max_entries < 1:
            raise OptkitError("cache max_entries must be >= 1")
        self.threshold = threshold  # None = no threshold met the bound: exact matches only
        self.embedder = embedder
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.ann = ann
        self.ann_min_entries = ann_min_entries
        self.centroids = None if centroids is None else l2_normalize(np.asarray(centroids))
        # A cluster threshold of None = that cluster never serves semantic hits.
        self.cluster_thresholds = (None if cluster_thresholds is None else
                                   np.array([np.inf if t is None else t for t in cluster_thresholds], np.float64))
        if self.centroids is not None and len(self.centroids) != len(self.cluster_thresholds):
            raise OptkitError("cache config: centroids and cluster thresholds differ in length")
        self.config = config or {}
        self.clock = clock
        self._spaces: dict[str, _Space] = {}
        self._order: deque = deque()  # (namespace, row) in insertion order: oldest first (TTL and eviction)
        self._live = 0
        self._faiss = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Union[str, Path], embedder: Any = None, **overrides) -> "SemanticCache":
        """A cache configured by a `cache.json` written by the cache stage.

        `embedder`: None (load the model the config names), a model reference, or a loaded model / callable.
        Whatever it is must reproduce the probe embeddings stored in the config; a different embedding space
        is refused, because its similarities would be judged against a threshold tuned for another space.
        `overrides`: runtime settings (ttl_s, max_entries, ann, ann_min_entries, clock).
        """
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise OptkitError(f"cache config not found: {path}") from None
        except ValueError as exc:
            raise OptkitError(f"{path}: not valid JSON ({exc})") from None
        if cfg.get("format") != FORMAT:
            raise OptkitError(f"{path}: not an optkit cache config (format {cfg.get('format')!r}, want {FORMAT})")
        if cfg.get("similarity", {}).get("kind") != "cosine":
            raise OptkitError(f"{path}: unsupported similarity {cfg.get('similarity')}")
        emb = cfg["embedder"]
        if embedder is None or isinstance(embedder, (str, Path)):
            from toolkit.models import load_embedder

            embedder = load_embedder(str(embedder or emb["model"]))
        check_embedder(embedder, emb, source=str(path))
        runtime = {**cfg.get("runtime", {}), **overrides}
        adaptive = cfg.get("adaptive") or {}
        use_clusters = bool(adaptive.get("exported"))
        return cls(cfg.get("threshold"), embedder, ttl_s=runtime.get("ttl_s"),
                   max_entries=runtime.get("max_entries", 100_000), ann=runtime.get("ann", "auto"),
                   ann_min_entries=runtime.get("ann_min_entries", 20_000),
                   centroids=np.array(adaptive["centroids"], np.float32) if use_clusters else None,
                   cluster_thresholds=adaptive["thresholds"] if use_clusters else None,
                   config=cfg, **({"clock": runtime["clock"]} if "clock" in runtime else {}))

    # ------------------------------------------------------------------ public API

    def lookup(self, query: str, namespace: Namespace = "default") -> Optional[Hit]:
        """The cached answer for `query` in `namespace`, or None (a miss)."""
        ns = namespace_key(namespace)
        self._expire()
        space = self._spaces.get(ns)
        if space is None or space.live == 0:
            return None
        row = space.exact.get(normalize_text(query))
        if row is not None:
            return self._hit(space, ns, row, 1.0, exact=True)
        if self.threshold is None and self.cluster_thresholds is None:
            return None  # no semantic threshold met the bound: exact matches only
        return self.lookup_vector(self._embed([query])[0], ns)

    def lookup_vector(self, vec: np.ndarray, namespace: Namespace = "default") -> Optional[Hit]:
        """The semantic layer alone, for an already-embedded query (normalized here: cosine, as tuned)."""
        ns = namespace_key(namespace)
        self._expire()
        space = self._spaces.get(ns)
        if space is None:
            return None
        row, sim = space.nearest(l2_normalize(vec))
        if row < 0 or sim < self._threshold_of(space, row):
            return None
        return self._hit(space, ns, row, sim, exact=False)

    def insert(self, query: str, answer: Any, namespace: Namespace = "default") -> None:
        self.insert_many([query], [answer], namespace)

    def insert_many(self, queries: Sequence[str], answers: Sequence[Any], namespace: Namespace = "default",
                    vectors: Optional[np.ndarray] = None) -> None:
        """Insert several entries (embedded in one batch unless `vectors` are given)."""
        if len(queries) != len(answers):
            raise ValueError("queries and answers differ in length")
        if not len(queries):
            return
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise OptkitError("cache insert: a query must be a non-empty string")
        vecs = self._embed(queries) if vectors is None else l2_normalize(vectors)
        ns = namespace_key(namespace)
        self._expire()
        space = self._spaces.get(ns)
        if space is None:
            space = self._spaces[ns] = _Space(vecs.shape[1])
        elif vecs.shape[1] != space.vectors.shape[1]:
            raise OptkitError(f"cache insert: embedding dim {vecs.shape[1]} != {space.vectors.shape[1]}")
        clusters = self._clusters_of(vecs)
        now = self.clock()
        for q, a, v, c in zip(queries, answers, vecs, clusters):
            key = normalize_text(q)
            old = space.exact.get(key)
            if old is not None:  # a newer answer for the same query replaces the old one
                space.kill(old)
                self._live -= 1
            while self._live >= self.max_entries:
                self._evict_oldest()
            row = space.add(v, key, a, now, int(c))
            space.exact[key] = row
            self._order.append((ns, row))
            self._live += 1
        self._maybe_index(space)

    def __len__(self) -> int:
        self._expire()
        return self._live

    def namespaces(self) -> list[str]:
        return [ns for ns, s in self._spaces.items() if s.live]

    # ------------------------------------------------------------------ internals

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None:
            raise OptkitError("this SemanticCache has no embedder: pass one, or use lookup_vector/insert_many"
                              "(vectors=...)")
        return embed_texts(self.embedder, texts)

    def _clusters_of(self, vecs: np.ndarray) -> np.ndarray:
        if self.centroids is None:
            return np.zeros(len(vecs), np.int32)
        return np.argmax(vecs @ self.centroids.T, axis=1).astype(np.int32)

    def _threshold_of(self, space: _Space, row: int) -> float:
        if self.cluster_thresholds is not None:
            return float(self.cluster_thresholds[space.cluster[row]])
        return float("inf") if self.threshold is None else float(self.threshold)

    def _hit(self, space: _Space, ns: str, row: int, sim: float, exact: bool) -> Hit:
        return Hit(space.answers[row], float(sim), exact, space.queries[row], ns,
                   self.clock() - float(space.created[row]))

    def _expire(self) -> None:
        """Drop entries older than the TTL. Entries are created in order, so the expired ones are a prefix."""
        limit = float("-inf") if self.ttl_s is None else self.clock() - self.ttl_s
        while self._order:
            ns, row = self._order[0]
            space = self._spaces[ns]
            if space.alive[row] and space.created[row] > limit:
                break
            self._order.popleft()
            if space.alive[row]:
                space.kill(row)
                self._live -= 1
        self._compact_if_sparse()

    def _evict_oldest(self) -> None:
        while self._order:
            ns, row = self._order.popleft()
            space = self._spaces[ns]
            if space.alive[row]:
                space.kill(row)
                self._live -= 1
                return

    def _compact_if_sparse(self) -> None:
        """Reclaim dead rows once they are most of a namespace (keeps memory and scan time bounded)."""
        for ns, space in list(self._spaces.items()):
            if space.size > 1024 and space.live < space.size // 2:
                new, mapping = space.compacted()
                self._spaces[ns] = new
                self._order = deque((n, mapping[r]) if n == ns else (n, r) for n, r in self._order
                                    if n != ns or r in mapping)
                self._maybe_index(new)

    def _maybe_index(self, space: _Space) -> None:
        if space.index is not None or self.ann == "numpy":
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


def probe_vectors(embedder: Any) -> np.ndarray:
    return embed_texts(embedder, PROBES)


def check_embedder(embedder: Any, recorded: dict, source: str = "cache.json") -> None:
    """Refuse an embedder whose space differs from the one the threshold was tuned in."""
    want = np.asarray(recorded["probe_vectors"], dtype=np.float32)
    got = probe_vectors(embedder)
    if got.shape != want.shape:
        raise OptkitError(f"{source}: the embedder gives {got.shape[1]}-dim vectors but the cache was tuned with "
                          f"'{recorded['model']}' ({want.shape[1]}-dim); load it with that embedder")
    cos = float(np.min(np.sum(got * l2_normalize(want), axis=1)))
    if cos < PROBE_MIN_COSINE:
        raise OptkitError(f"{source}: the embedder differs from '{recorded['model']}' "
                          f"({recorded.get('revision')}) that the threshold was tuned with (probe cosine {cos:.3f}); "
                          "mixing embedding spaces breaks the cache: load it with the same embedder")
