"""The entries of one cache namespace, and the canonical key that names a namespace.

Not thread-safe on its own: `SemanticCache` holds its lock around every call into a `Space`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

import numpy as np

from toolkit.errors import OptkitError

Namespace = Union[str, Mapping[str, Any]]
_SCALARS = (str, int, float, bool, type(None))


def namespace_key(ns: Namespace) -> str:
    """A canonical, structured key: two namespaces share a key only if they are equal value for value and type
    for type. A string namespace is a JSON string literal, a mapping a JSON array of [key, value] pairs sorted by
    key; JSON escapes every separator, so no value can forge another namespace's key ("tenant=acme" and
    {"tenant": "acme"}, {"a": "1|b=2"} and {"a": "1", "b": "2"}, {"t": 1} and {"t": "1"} all differ)."""
    if isinstance(ns, str):
        return json.dumps(ns, ensure_ascii=False)
    if not isinstance(ns, Mapping):
        raise OptkitError(f"cache namespace must be a str or a mapping, got {type(ns).__name__}")
    for k, v in ns.items():
        if not isinstance(k, str):
            raise OptkitError(f"cache namespace keys must be strings, got {k!r}")
        if not isinstance(v, _SCALARS) or (isinstance(v, float) and not np.isfinite(v)):
            raise OptkitError(f"cache namespace value of '{k}' must be a str, int, finite float, bool or None, "
                              f"got {type(v).__name__}")
    return json.dumps(sorted(ns.items()), ensure_ascii=False, allow_nan=False)


def quota_key(ns: Namespace, by: Optional[str]) -> str:
    """What a quota counts under: the namespace's `by` field (quota_by="tenant": every namespace of one tenant --
    its conversation contexts, models, parameters -- shares one quota), else the namespace itself."""
    if by is not None and isinstance(ns, Mapping) and by in ns:
        return namespace_key({by: ns[by]})
    return namespace_key(ns)


class Space:
    """One namespace's entries: vectors in a growable matrix (rows in insertion order), an exact-match map,
    and an optional faiss HNSW index. Rows are appended in time order, so the oldest live entry is the first
    live row at or after `head`, and TTL expiry removes a prefix."""

    def __init__(self, dim: int, capacity: int = 4):
        # Small at first: a gateway keys a namespace per tenant, conversation context and parameters, most of
        # which hold one entry (64 rows each cost ~100 KB at dim 384: 20k namespaces took 2 GB)
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.alive = np.zeros(capacity, dtype=bool)
        self.created = np.zeros(capacity, dtype=np.float64)
        self.seq = np.zeros(capacity, dtype=np.int64)  # global insertion number: orders entries across namespaces
        self.cluster = np.zeros(capacity, dtype=np.int32)
        self.queries: list[str] = []
        self.answers: list[Any] = []
        self.exact: dict[str, int] = {}
        self.size = 0  # rows used (live and dead)
        self.live = 0
        self.head = 0  # no live row before this one
        self.index = None  # faiss index over rows [0, indexed)
        self.indexed = 0

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def add(self, vec: np.ndarray, query: str, answer: Any, created: float, cluster: int, seq: int) -> int:
        if self.size == len(self.alive):  # grow by doubling: amortized O(1) inserts
            grow = len(self.alive)
            self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors[:grow])])
            self.alive = np.concatenate([self.alive, np.zeros(grow, bool)])
            self.created = np.concatenate([self.created, np.zeros(grow)])
            self.seq = np.concatenate([self.seq, np.zeros(grow, np.int64)])
            self.cluster = np.concatenate([self.cluster, np.zeros(grow, np.int32)])
        row = self.size
        self.vectors[row], self.alive[row], self.created[row] = vec, True, created
        self.seq[row], self.cluster[row] = seq, cluster
        self.queries.append(query)
        self.answers.append(answer)
        self.exact[query] = row
        self.size += 1
        self.live += 1
        return row

    def kill(self, row: int) -> bool:
        """Remove a row; False if it was already dead."""
        if not self.alive[row]:
            return False
        self.alive[row] = False
        self.live -= 1
        key = self.queries[row]
        if self.exact.get(key) == row:
            del self.exact[key]
        self.answers[row] = None  # free the payload now; the row is reclaimed at the next compaction
        return True

    def row_of(self, seq: int) -> int:
        """Row of the live entry with this insertion number, -1 when it is gone (rows are in seq order)."""
        row = int(np.searchsorted(self.seq[: self.size], seq))
        return row if row < self.size and self.seq[row] == seq and self.alive[row] else -1

    def oldest(self) -> int:
        """Row of the oldest live entry, -1 when none."""
        while self.head < self.size and not self.alive[self.head]:
            self.head += 1
        return self.head if self.head < self.size else -1

    def expire(self, limit: float) -> int:
        """Kill entries created at or before `limit`; how many were killed."""
        killed = 0
        row = self.oldest()
        while row >= 0 and self.created[row] <= limit:
            killed += self.kill(row)
            row = self.oldest()
        return killed

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
        index = faiss_module.IndexHNSWFlat(self.dim, 32, faiss_module.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
        self.index, self.indexed = index, 0
        self._sync_index()

    def sparse(self) -> bool:
        """More dead rows than live ones (and than a few): a quota, TTL or replaced answers leave dead rows in
        every namespace, and each costs memory and a scan on lookup until compaction."""
        return self.size - self.live > max(self.live, 32)

    def compacted(self) -> "Space":
        """A copy with dead rows dropped (order, and so TTL/eviction order, kept)."""
        new = Space(self.dim, capacity=max(4, self.live))
        for row in np.nonzero(self.alive[: self.size])[0]:
            new.add(self.vectors[row], self.queries[row], self.answers[row], float(self.created[row]),
                    int(self.cluster[row]), int(self.seq[row]))
        return new
