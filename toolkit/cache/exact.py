"""The exact-match layer of the composed system, behind one store seam: memory (this process) or redis (one
server shared by every gateway replica, so an answer fetched through replica A is an exact hit on replica B).

It is the only exact layer the decision path uses (toolkit/serve/decide.py): the semantic cache is then asked
for its nearest neighbour only. It works without a semantic cache (a bundle with no cache.json: exact-only).
Keys are (canonical namespace key, normalized text), the semantic cache's own rules (space.namespace_key,
runtime.normalize_text): namespaces (tenant, model, system prompt, parameters) never share an entry.

Redis layout (under one hash tag `{prefix:exact:fingerprint}`; the fingerprint hashes ttl_s and max_entries, so
replicas share entries only when they expire and evict alike):
  k:<sha(namespace)>:<sha(text)>   strict JSON {"n": namespace key, "q": text, "a": answer}, PEXPIRE ttl
  all                              sorted set of live keys by insertion number (max_entries evicts its front)
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

from toolkit.cache.space import Namespace, namespace_key
from toolkit.errors import OptkitError

log = logging.getLogger("optkit.cache")


def exact_key(text: str, namespace: Namespace) -> tuple[str, str]:
    from toolkit.cache.runtime import normalize_text  # the semantic cache's rule: NFC + collapsed whitespace

    return namespace_key(namespace), normalize_text(text)


class ExactStore:
    """Memory store: thread-safe and bounded (oldest evicted first); entries older than ttl_s are never served."""

    def __init__(self, max_entries: int = 100_000, ttl_s: Optional[float] = None,
                 clock: Callable[[], float] = time.time):
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()

    def get(self, text: str, namespace: Namespace = "default") -> Optional[Any]:
        key = exact_key(text, namespace)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.ttl_s is not None and self.clock() - item[1] >= self.ttl_s:  # as the semantic layer: age >= ttl
                del self._items[key]
                return None
            return item[0]

    def put(self, text: str, answer: Any, namespace: Namespace = "default") -> None:
        key = exact_key(text, namespace)
        with self._lock:
            self._items.pop(key, None)  # a newer answer replaces the old one and becomes the youngest
            self._items[key] = (answer, self.clock())
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def put_many(self, texts: list[str], answers: list[Any], namespace: Namespace = "default") -> None:
        for text, answer in zip(texts, answers):
            self.put(text, answer, namespace)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# KEYS: all, seq. ARGV: base, ttl_ms (0 = none), max_entries, then per entry: key suffix, value.
_PUT_LUA = """
local all, seqk, base = KEYS[1], KEYS[2], ARGV[1]
local ttl, maxn = tonumber(ARGV[2]), tonumber(ARGV[3])
local function purge()  -- expired keys leave the front of `all` (they expire oldest first)
  while true do
    local first = redis.call('ZRANGE', all, 0, 0)[1]
    if not first or redis.call('EXISTS', first) == 1 then return end
    redis.call('ZREM', all, first)
  end
end
for j = 4, #ARGV, 2 do
  local k = base .. ':k:' .. ARGV[j]
  if ttl > 0 then redis.call('SET', k, ARGV[j + 1], 'PX', ttl) else redis.call('SET', k, ARGV[j + 1]) end
  redis.call('ZADD', all, redis.call('INCR', seqk), k)  -- a replaced key moves to the back: the youngest
  purge()
  while redis.call('ZCARD', all) > maxn do
    local first = redis.call('ZRANGE', all, 0, 0)[1]
    redis.call('ZREM', all, first)
    redis.call('DEL', first)
  end
end
if ttl > 0 then redis.call('PEXPIRE', all, ttl + 60000) redis.call('PEXPIRE', seqk, ttl + 60000) end
return redis.call('ZCARD', all)
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class RedisExactStore:
    """Redis store: the same get / put / len as ExactStore, shared by every process using the same URL, prefix,
    ttl_s and max_entries. TTL is Redis's (server clock). Answers must be JSON values. While Redis is down, gets
    miss and puts are dropped (one warning per 30 s): the gateway keeps answering from its backends."""

    def __init__(self, url: Optional[str] = None, prefix: str = "optkit", max_entries: int = 100_000,
                 ttl_s: Optional[float] = None, client: Any = None, timeout_s: float = 1.0):
        from toolkit.cache.store_redis import connect

        self.max_entries, self.ttl_s = max_entries, ttl_s
        self.redis, self.url, self._errors = connect(url, prefix, client, timeout_s)
        spec = {"format": "optkit-exact-redis/1", "ttl_s": ttl_s, "max_entries": max_entries}
        self.base = "{%s:exact:%s}" % (prefix, _sha(json.dumps(spec, sort_keys=True))[:16])
        self._put = self.redis.register_script(_PUT_LUA)
        self._warned = float("-inf")
        try:
            self.redis.ping()
        except self._errors as exc:
            from toolkit.redact import redact_text

            raise OptkitError(f"cache store redis: cannot reach {self.url}: {redact_text(str(exc))}") from None
        log.info("cache: exact matches shared through redis %s under %s", self.url, self.base)

    def _suffix(self, ns: str, text: str) -> str:
        return f"{_sha(ns)}:{_sha(text)}"

    def get(self, text: str, namespace: Namespace = "default") -> Optional[Any]:
        ns, norm = exact_key(text, namespace)
        try:
            raw = self.redis.get(f"{self.base}:k:{self._suffix(ns, norm)}")
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
            args += [self._suffix(ns, norm), value]
        ttl_ms = 0 if self.ttl_s is None else max(1, int(round(self.ttl_s * 1000)))
        try:
            for i in range(0, len(args), 1024):  # 512 entries per round trip
                self._put(keys=[f"{self.base}:all", f"{self.base}:seq"],
                          args=[self.base, ttl_ms, self.max_entries] + args[i: i + 1024])
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
                redis_prefix: str = "optkit"):
    """The exact layer for a store setting (CachePolicy.store_settings(): {} = memory)."""
    if store == "redis":
        return RedisExactStore(redis_url, redis_prefix, max_entries, ttl_s)
    return ExactStore(max_entries, ttl_s)
