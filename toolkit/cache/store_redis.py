"""SemanticCache entries in one Redis server shared by every gateway replica (`cache.store: redis`).

Each replica mirrors a namespace's entries locally (the same `Space` the memory store uses, so the threshold,
cluster thresholds and ANN search are unchanged) and brings the mirror up to date from Redis in ONE round trip
before every lookup of that namespace. Writes go to Redis only, through one Lua script that runs atomically.

Key layout and the write script: toolkit/cache/redis_lua.py.

Guarantees (tested in tests/cache/test_redis_store.py): an insert that returned on replica A is visible to any
lookup that starts after it on replica B, and an entry evicted, replaced or expired before a lookup starts is
never served by it (deletions arrive as events; expiry is judged by Redis's clock on every replica). A mirror
only ever holds entries whose stored canonical namespace key equals the namespace looked up, so no hit crosses
namespaces, whatever the writers do concurrently. Quotas and max_entries are enforced inside the script, so they
hold across replicas. If Redis is unreachable a lookup is a miss and an insert is skipped (logged, rate-limited):
the cache is an optimization, never a reason to fail a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from toolkit.cache.redis_lua import COUNT_LUA, INSERT_LUA
from toolkit.cache.runtime import SemanticCache
from toolkit.cache.space import Namespace, Space, namespace_key
from toolkit.errors import MissingExtraError, OptkitError
from toolkit.redact import redact_text, redact_url

log = logging.getLogger("optkit.cache")
URL_ENV = "OPTKIT_REDIS_URL"
LOG_MAXLEN = 1000  # events kept per namespace; a replica further behind re-reads the namespace whole
BATCH = 512  # events / entries per round trip
MAX_MIRRORED = 10_000  # namespaces whose sync state a replica keeps (least recently used dropped, re-read later)
_FIELDS = ("q", "a", "v", "c", "t", "n")


def _redis():
    try:
        import redis
    except ImportError:
        raise MissingExtraError("cache store redis", "redis", "serve") from None
    return redis


def connect(url: Optional[str], prefix: str, client: Any = None, timeout_s: float = 1.0) -> tuple:
    """(client, the URL redacted for logs, the exceptions that mean Redis is unreachable): one short timeout and
    one retry, so a Redis outage costs a request at most ~2 timeouts (both cache layers connect this way)."""
    redis = _redis()
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
        raise OptkitError(f"cache redis_prefix must be 1-64 of [A-Za-z0-9_.:-], got {str(prefix)[:70]!r}")
    url = url or os.environ.get(URL_ENV) or None
    shown = redact_url(url) if url else "(a given client)"
    if client is None:
        if not url:
            raise OptkitError(f"cache store redis: no Redis URL (set {URL_ENV} or cache.redis_url)")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          retry=Retry(NoBackoff(), 1))
        except ValueError as exc:
            # redis-py's message quotes parts of the URL (a password cut at '/', '#' or '?' reads as the port)
            raise OptkitError(f"cache store redis: bad URL {shown}: {type(exc).__name__} (percent-encode '/', '#', "
                              "'?' and '@' in the password)") from None
    return client, shown, (redis.RedisError, OSError)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in strict JSON")


class _State:
    __slots__ = ("ver", "last")

    def __init__(self, ver: int, last: str):
        self.ver, self.last = ver, last


class RedisSemanticCache(SemanticCache):
    """A SemanticCache whose entries live in Redis, shared by every process that uses the same URL, prefix and
    cache config. Same API and decisions as the memory store; answers must be JSON values. `url`: redis://,
    rediss:// or unix:// (default: the OPTKIT_REDIS_URL environment variable; a password in it is never logged).
    The `clock` is Redis's: TTL is judged by the server's time on every replica."""

    def __init__(self, threshold: Optional[float], embedder: Any = None, *, url: Optional[str] = None,
                 prefix: str = "optkit", client: Any = None, timeout_s: float = 1.0, **settings):
        settings.pop("clock", None)
        self._offset = 0.0  # Redis server time - local time
        super().__init__(threshold, embedder, clock=self._server_time, **settings)
        self.redis, self.url, self._errors = connect(url, prefix, client, timeout_s)
        self.base = "{%s:%s}" % (prefix, self.fingerprint())
        self._insert_script = self.redis.register_script(INSERT_LUA)
        self._count_script = self.redis.register_script(COUNT_LUA)
        probes = self.config.get("embedder", {}).get("probe_vectors")
        self._dim: Optional[int] = len(probes[0]) if probes else None
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._warned = float("-inf")
        try:
            started = time.time()
            self._set_offset(self.redis.time(), started)
        except self._errors as exc:
            raise OptkitError(f"cache store redis: cannot reach {self.url}: {redact_text(str(exc))}") from None
        log.info("cache: entries shared through redis %s under %s", self.url, self.base)

    def fingerprint(self) -> str:
        """What replicas must agree on to share entries: the embedding space, clusters, TTL and limits."""
        emb = self.config.get("embedder") or {}
        spec = {"format": "optkit-cache-redis/1", "embedder": [emb.get("model"), emb.get("revision"),
                                                              emb.get("probe_vectors")],
                "centroids": None if self.centroids is None else np.round(self.centroids, 6).tolist(),
                "ttl_s": self.ttl_s, "max_entries": self.max_entries, "quota": self.max_entries_per_namespace,
                **({"quota_by": self.quota_by} if self.quota_by else {})}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ public API (memory store's, plus sync)

    def lookup(self, query: str, namespace: Namespace = "default", exact: bool = True):
        return super().lookup(query, namespace, exact) if self._synced(namespace_key(namespace)) else None

    def lookup_vector(self, vec: np.ndarray, namespace: Namespace = "default"):
        return super().lookup_vector(vec, namespace) if self._synced(namespace_key(namespace)) else None

    def __len__(self) -> int:
        """Live entries in the shared store (all replicas, all namespaces)."""
        try:
            return int(self._count_script(keys=[self._key("all")], args=[self.base]))
        except self._errors as exc:
            self._degraded("count", exc)
            return super().__len__()

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ writes

    def _store(self, ns: str, keys: list, answers: list, vecs: np.ndarray, clusters: np.ndarray,
               group: str) -> None:
        try:
            encoded = [json.dumps(a, ensure_ascii=False, allow_nan=False, separators=(",", ":")) for a in answers]
        except (TypeError, ValueError) as exc:
            raise OptkitError(f"cache store redis: answers must be JSON values ({exc})") from None
        if self._dim is not None and vecs.shape[1] != self._dim:
            raise OptkitError(f"cache insert: embedding dim {vecs.shape[1]} != {self._dim}")
        self._dim = vecs.shape[1]
        h = _digest(ns)
        ttl_ms = 0 if self.ttl_s is None else max(1, int(round(self.ttl_s * 1000)))
        # the set the quota counts: the namespace's own ids, or its quota key's (only kept when a quota is set)
        shared = group != ns and self.max_entries_per_namespace
        counted = self._key("g", _digest(group), "ids") if shared else self._key("ns", h, "ids")
        head = [self.base, h, ns, ttl_ms, self.max_entries_per_namespace or 0, self.max_entries, LOG_MAXLEN, counted]
        rows = [[k, _digest(k), a, np.asarray(v, "<f4").tobytes(), int(c)]
                for k, a, v, c in zip(keys, encoded, vecs, clusters)]
        try:
            for i in range(0, len(rows), BATCH):
                args = head + [x for row in rows[i: i + BATCH] for x in row]
                self._insert_script(keys=[self._key("seq"), self._key("all")], args=args)
        except self._errors as exc:
            self._degraded("insert", exc)

    # ------------------------------------------------------------------ sync (network outside the lock)

    def _synced(self, ns: str) -> bool:
        try:
            self._sync(ns)
            return True
        except self._errors as exc:
            self._degraded("lookup", exc)
            return False

    def _sync(self, ns: str) -> None:
        """Bring this namespace's mirror up to date: one round trip when nothing changed."""
        h = _digest(ns)
        with self._lock:
            state = self._states.get(ns)
            if state is not None:
                self._states.move_to_end(ns)
                last = state.last
        if state is None:
            return self._resync(ns, h)
        while True:
            started = time.time()
            pipe = self.redis.pipeline(transaction=False)
            pipe.time()
            pipe.get(self._key("ns", h, "ver"))
            pipe.xrange(self._key("ns", h, "log"), min="(" + last, count=BATCH)
            now, ver, events = pipe.execute()
            self._set_offset(now, started)
            events = [(eid.decode(), {k.decode(): int(v) if k != b"op" else v.decode() for k, v in f.items()})
                      for eid, f in events]
            adds = self._fetch([e["id"] for _, e in events if e["op"] == "add"])
            with self._lock:
                if not self._apply(ns, int(ver or 0), events, adds):
                    break
                last = self._states[ns].last
                self._bound(ns)
            if len(events) < BATCH:
                return
        self._resync(ns, h)

    def _apply(self, ns: str, ver: int, events: list, adds: dict) -> bool:
        """Apply events in chain order (caller holds the lock); False when the chain is broken (resync)."""
        state = self._states.get(ns)
        if state is None:
            return False
        if not events and ver == 0 and state.ver != 0:  # the namespace is gone from Redis (emptied or expired)
            self._drop(ns)
            self._states[ns] = _State(0, "0-0")
            return True
        for eid, e in events:
            if e["seq"] <= state.ver:
                continue  # applied already (another thread synced the same events)
            if e["prev"] != state.ver:
                return False
            if e["op"] == "add":
                self._add(ns, e["id"], adds.get(e["id"]))
            else:
                self._remove(ns, e["id"])
            state.ver, state.last = e["seq"], eid
        return state.ver >= ver  # the log reached what GET ver saw just before it (else a gap: resync)

    def _resync(self, ns: str, h: str) -> None:
        """Read the namespace whole: its ids and the matching log position in one transaction."""
        started = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.time()
        pipe.get(self._key("ns", h, "ver"))
        pipe.xrevrange(self._key("ns", h, "log"), count=1)
        pipe.zrange(self._key("ns", h, "ids"), 0, -1)
        now, ver, tail, ids = pipe.execute()
        self._set_offset(now, started)
        ids = sorted(int(i) for i in ids)
        entries = self._fetch(ids)
        ver = int(ver or 0)
        with self._lock:
            state = self._states.get(ns)
            if state is not None and state.ver > ver:
                return  # another thread got further meanwhile
            self._drop(ns)
            for i in ids:
                self._add(ns, i, entries.get(i))
            self._states[ns] = _State(ver, tail[0][0].decode() if tail else "0-0")
            self._states.move_to_end(ns)
            self._bound(ns)

    def _fetch(self, ids: list) -> dict:
        out = {}
        for i in range(0, len(ids), BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for j in ids[i: i + BATCH]:
                pipe.hmget(self._key("e", j), *_FIELDS)
            out.update(zip(ids[i: i + BATCH], pipe.execute()))
        return out

    # ------------------------------------------------------------------ the mirror (caller holds the lock)

    def _add(self, ns: str, eid: int, values) -> None:
        entry = self._decode(ns, eid, values)
        if entry is None:
            return  # gone already (a del event follows) or refused
        query, answer, vec, cluster, created = entry
        if self.ttl_s is not None and created <= self.clock() - self.ttl_s:
            return
        space = self._spaces.get(ns)
        if space is not None and space.size and space.seq[space.size - 1] >= eid:
            return
        if space is not None and query in space.exact:  # the same query re-answered: the newer entry wins
            self._kill(ns, space, space.exact[query])
            space = self._spaces.get(ns)
        if space is None:  # a mirror keeps no quota bookkeeping: Redis enforces the quota (redis_lua.py)
            space = self._spaces[ns] = Space(len(vec))
        self._added(ns, space, space.add(vec, query, answer, created, cluster, eid))
        self._maybe_index(space)

    def _remove(self, ns: str, eid: int) -> None:
        space = self._spaces.get(ns)
        if space is None:
            return
        row = int(np.searchsorted(space.seq[: space.size], eid))
        if row < space.size and space.seq[row] == eid:
            self._kill(ns, space, row)

    def _decode(self, ns: str, eid: int, values) -> Optional[tuple]:
        if values is None or values[0] is None:
            return None
        q, a, v, c, t, n = values
        try:
            if n.decode("utf-8") != ns:  # only ever the namespace asked for
                raise ValueError("namespace key differs")
            vec = np.frombuffer(v, dtype="<f4").astype(np.float32)
            if (self._dim is not None and len(vec) != self._dim) or not len(vec) or not np.all(np.isfinite(vec)):
                raise ValueError(f"vector of {len(vec)} values or not finite")
            answer = json.loads(a.decode("utf-8"), parse_constant=_reject_constant)
            return q.decode("utf-8"), answer, vec, int(c), float(t)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("cache: redis entry %s skipped: %s", eid, exc)
            return None

    def _drop(self, ns: str) -> None:
        space = self._spaces.pop(ns, None)
        if space is not None:
            self._live -= space.live

    def _bound(self, keep: str) -> None:
        """Mirrors are bounded: least recently synced namespaces are dropped (and re-read if asked again)."""
        while len(self._states) > MAX_MIRRORED or (self._live > self.max_entries and len(self._states) > 1):
            ns = next(iter(self._states))
            if ns == keep:
                break
            del self._states[ns]
            self._drop(ns)

    # ------------------------------------------------------------------ helpers

    def _key(self, *parts) -> str:
        return ":".join([self.base, *map(str, parts)])

    def _server_time(self) -> float:
        return time.time() + self._offset

    def _set_offset(self, now, started: float) -> None:
        sec, usec = now
        self._offset = sec + usec / 1e6 - (started + time.time()) / 2

    def _degraded(self, what: str, exc: Exception) -> None:
        if time.monotonic() - self._warned > 30:
            self._warned = time.monotonic()
            log.warning("cache: redis %s %s failed (%s: %s); serving misses and storing nothing until it is back",
                        self.url, what, type(exc).__name__, redact_text(str(exc))[:200])
