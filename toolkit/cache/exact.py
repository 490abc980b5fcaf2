"""The exact-match layer of the composed system, behind one store seam: memory (this process) or redis (one
server shared by every gateway replica, so an answer fetched through replica A is an exact hit on replica B).

It is the only exact layer the decision path uses (toolkit/serve/decide.py): the semantic cache is then asked
for its nearest neighbour only. It works without a semantic cache (a bundle with no cache.json: exact-only).
Keys are (canonical namespace key, normalized text), the semantic cache's own rules (space.namespace_key,
runtime.normalize_text): namespaces (tenant, model, system prompt, parameters) never share an entry.

A quota (the gateway: per tenant, `quota_by="tenant"`, the semantic layer's rule) makes an insert evict the
oldest entry of its own quota key first, so one tenant's traffic never evicts another tenant's exact entries.

Redis layout (under one hash tag `{prefix:exact:fingerprint}`; the fingerprint hashes ttl_s, max_entries and the
quota, so replicas share entries only when they expire and evict alike):
  k:<sha(quota key)>:<sha(namespace)>:<sha(text)>   strict JSON {"n": namespace key, "q": text, "a": answer},
                                   PEXPIRE ttl
  all                              sorted set of live keys by insertion number (max_entries evicts its front)
  g:<sha(quota key)>               the quota key's live keys by insertion number (the quota evicts its front)
  seq                              insertion counter
Values are checked on read (namespace and text must match the request), so even a hash collision cannot serve
another namespace's answer. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

from toolkit.cache.space import Namespace, namespace_key, quota_key
from toolkit.errors import OptkitError

log = logging.getLogger("optkit.cache")


def exact_key(text: str, namespace: Namespace) -> tuple[str, str]:
    from toolkit.cache.runtime import normalize_text  # the semantic cache's rule: NFC + collapsed whitespace

    return namespace_key(namespace), normalize_text(text)


class ExactStore:
    """Memory store: thread-safe and bounded (oldest evicted first; with a quota, the quota key's oldest first);
    entries older than ttl_s are never served."""

    def __init__(self, max_entries: int = 100_000, ttl_s: Optional[float] = None,
                 clock: Callable[[], float] = time.time, quota: Optional[int] = None,
                 quota_by: Optional[str] = None):
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self.quota, self.quota_by = quota, quota_by
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[Any, float, str]] = OrderedDict()
        self._groups: dict[str, OrderedDict[tuple[str, str], None]] = {}  # quota key -> its keys, oldest first

    def get(self, text: str, namespace: Namespace = "default") -> Optional[Any]:
        key = exact_key(text, namespace)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.ttl_s is not None and self.clock() - item[1] >= self.ttl_s:  # as the semantic layer: age >= ttl
                self._drop(key)
                return None
            return item[0]

    def put(self, text: str, answer: Any, namespace: Namespace = "default") -> None:
        key, group = exact_key(text, namespace), quota_key(namespace, self.quota_by)
        with self._lock:
            self._drop(key)  # a newer answer replaces the old one and becomes the youngest
            while self.quota is not None and len(self._groups.get(group, ())) >= self.quota:
                self._drop(next(iter(self._groups[group])))  # only this quota key's own entries
            while len(self._items) >= self.max_entries:
                self._drop(next(iter(self._items)))
            self._items[key] = (answer, self.clock(), group)
            self._groups.setdefault(group, OrderedDict())[key] = None

    def _drop(self, key: tuple[str, str]) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            keys = self._groups[item[2]]
            del keys[key]
            if not keys:
                del self._groups[item[2]]

    def put_many(self, texts: list[str], answers: list[Any], namespace: Namespace = "default") -> None:
        for text, answer in zip(texts, answers):
            self.put(text, answer, namespace)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# KEYS: all, seq. ARGV: base, ttl_ms (0 = none), max_entries, quota (0 = none), then per entry: key suffix
# (<sha(quota key)>:<sha(namespace)>:<sha(text)>), value.
_PUT_LUA = """
local all, seqk, base = KEYS[1], KEYS[2], ARGV[1]
local ttl, maxn, quota = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function group_of(k)  -- the quota key's set, named by the key's first hash
  return base .. ':g:' .. string.match(k, '(%x+):%x+:%x+$')
end
local function purge(z)  -- expired keys leave the front of a set (they expire oldest first)
  while true do
    local first = redis.call('ZRANGE', z, 0, 0)[1]
    if not first or redis.call('EXISTS', first) == 1 then return end
    redis.call('ZREM', z, first)
  end
end
local function kill(k)
  redis.call('ZREM', all, k)
  redis.call('ZREM', group_of(k), k)
  redis.call('DEL', k)
end
for j = 5, #ARGV, 2 do
  local k = base .. ':k:' .. ARGV[j]
  local g = group_of(k)
  if redis.call('EXISTS', k) == 1 then kill(k) end  -- a newer answer replaces the old one: the youngest
  purge(all)
  if quota > 0 then
    purge(g)
    while redis.call('ZCARD', g) >= quota do kill(redis.call('ZRANGE', g, 0, 0)[1]) end
  end
  while redis.call('ZCARD', all) >= maxn do kill(redis.call('ZRANGE', all, 0, 0)[1]) end
  if ttl > 0 then redis.call('SET', k, ARGV[j + 1], 'PX', ttl) else redis.call('SET', k, ARGV[j + 1]) end
  local seq = redis.call('INCR', seqk)
  redis.call('ZADD', all, seq, k)
  if quota > 0 then
    redis.call('ZADD', g, seq, k)
    if ttl > 0 then redis.call('PEXPIRE', g, ttl + 60000) end
  end
end
if ttl > 0 then redis.call('PEXPIRE', all, ttl + 60000) redis.call('PEXPIRE', seqk, ttl + 60000) end
return redis.call('ZCARD', all)
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class RedisExactStore:
    """Redis store: the same get / put / len as ExactStore, shared by every process using the same URL, prefix,
    ttl_s, max_entries and quota. TTL is Redis's (server clock). Answers must be JSON values. While Redis is down, gets
    miss and puts are dropped (one warning per 30 s): the gateway keeps answering from its backends."""

    def __init__(self, url: Optional[str] = None, prefix: str = "optkit", max_entries: int = 100_000,
                 ttl_s: Optional[float] = None, client: Any = None, timeout_s: float = 1.0,
                 quota: Optional[int] = None, quota_by: Optional[str] = None):
        from toolkit.cache.store_redis import connect

        self.max_entries, self.ttl_s, self.quota, self.quota_by = max_entries, ttl_s, quota, quota_by
        self.redis, self.url, self._errors = connect(url, prefix, client, timeout_s)
        spec = {"format": "optkit-exact-redis/2", "ttl_s": ttl_s, "max_entries": max_entries, "quota": quota,
                "quota_by": quota_by}
        self.base = "{%s:exact:%s}" % (prefix, _sha(json.dumps(spec, sort_keys=True))[:16])
        self._put = self.redis.register_script(_PUT_LUA)
        self._warned = float("-inf")
        try:
            self.redis.ping()
        except self._errors as exc:
            from toolkit.redact import redact_text

            raise OptkitError(f"cache store redis: cannot reach {self.url}: {redact_text(str(exc))}") from None
        log.info("cache: exact matches shared through redis %s under %s", self.url, self.base)

    def _suffix(self, namespace: Namespace, ns: str, text: str) -> str:
        return f"{_sha(quota_key(namespace, self.quota_by))}:{_sha(ns)}:{_sha(text)}"

    def get(self, text: str, namespace: Namespace = "default") -> Optional[Any]:
        ns, norm = exact_key(text, namespace)
        try:
            raw = self.redis.get(f"{self.base}:k:{self._suffix(namespace, ns, norm)}")
        except self._errors as exc:
            self._degraded("get", exc)
            return None
        if raw is None:
            return None
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            if value["n"] != ns or value["q"] != norm:  # only ever the namespace and text asked for
                return None
            return value["a"]
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("cache: redis exact entry skipped: %s", type(exc).__name__)
            return None

    def put(self, text: str, answer: Any, namespace: Namespace = "default") -> None:
        self.put_many([text], [answer], namespace)

    def put_many(self, texts: list[str], answers: list[Any], namespace: Namespace = "default") -> None:
        args = []
        for text, answer in zip(texts, answers):
            ns, norm = exact_key(text, namespace)
            try:
                value = json.dumps({"n": ns, "q": norm, "a": answer}, ensure_ascii=False, allow_nan=False,
                                   separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise OptkitError(f"cache store redis: answers must be JSON values ({exc})") from None
            args += [self._suffix(namespace, ns, norm), value]
        ttl_ms = 0 if self.ttl_s is None else max(1, int(round(self.ttl_s * 1000)))
        try:
            for i in range(0, len(args), 1024):  # 512 entries per round trip
                self._put(keys=[f"{self.base}:all", f"{self.base}:seq"],
                          args=[self.base, ttl_ms, self.max_entries, self.quota or 0] + args[i: i + 1024])
        except self._errors as exc:
            self._degraded("put", exc)

    def __len__(self) -> int:
        """Live entries in the shared store (all replicas, all namespaces; expired ones may count until the next
        put purges them)."""
        try:
            return int(self.redis.zcard(f"{self.base}:all"))
        except self._errors as exc:
            self._degraded("count", exc)
            return 0

    def close(self) -> None:
        self.redis.close()

    def _degraded(self, what: str, exc: Exception) -> None:
        from toolkit.redact import redact_text

        if time.monotonic() - self._warned > 30:
            self._warned = time.monotonic()
            log.warning("cache: redis %s exact %s failed (%s: %s); exact misses until it is back", self.url, what,
                        type(exc).__name__, redact_text(str(exc))[:200])


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in strict JSON")


def exact_store(max_entries: int, ttl_s: Optional[float], store: str = "memory", redis_url: Optional[str] = None,
                redis_prefix: str = "optkit", quota: Optional[int] = None, quota_by: Optional[str] = None):
    """The exact layer for a store setting (CachePolicy.store_settings(): {} = memory)."""
    if store == "redis":
        return RedisExactStore(redis_url, redis_prefix, max_entries, ttl_s, quota=quota, quota_by=quota_by)
    return ExactStore(max_entries, ttl_s, quota=quota, quota_by=quota_by)
