"""The one client for OpenAI-compatible endpoints (OpenAI, vLLM serve, TGI, llama.cpp server), used by
collect's openai engine and evaluate's judge.

httpx async with at most `concurrency` requests in flight. Retried (tenacity, exponential backoff with
jitter; a server's Retry-After wins, up to MAX_RETRY_AFTER_S): 429, 408, 5xx, timeouts, dropped connections,
malformed replies (the caller's `parse` raises Retryable for those). Not retried: 401/403 (a bad key stops
the run at once), 404 (wrong base_url or model: every request would fail the same way), and an endpoint
that cannot be reached before any reply came back. Other 4xx replies fail only their request. Error lines
never carry the API key (registered for redaction) or credentials in the URL (redact_url).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from toolkit.errors import OptkitError
from toolkit.redact import redact_text, redact_url
from toolkit.runtime import redact, register_secret

MAX_RETRY_AFTER_S = 600.0  # honour a server's Retry-After, but not an absurd one


class Retryable(Exception):
    def __init__(self, message: str, kind: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind  # counted in stats: http_429, http_5xx, timeout, connection, malformed
        self.retry_after = retry_after


class PromptFailed(Exception):
    """This request cannot succeed as sent (a 4xx other than auth/404); others may."""


def snippet(text: str, n: int = 160) -> str:
    """A server's error body as one short redacted line (error messages stay one line)."""
    return " ".join(redact_text(redact(text[:n])).split())


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def url_secrets(url: str) -> list[str]:
    """The password and secret query values inside a URL (a server may echo them in an error body)."""
    from urllib.parse import parse_qsl, urlsplit

    from toolkit.redact import SECRET_PARAMS

    parts = urlsplit(url)
    return [v for v in [parts.password, *(v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_PARAMS)] if v]


def endpoint(base_url: str, path: str) -> str:
    """base_url + path, the path going before a query string (`…/v1?api-version=x` + `/chat/completions`)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    where: str  # the recipe section, for error messages: collect.openai, evaluate.judge
    api_key: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    concurrency: int = 8

    @classmethod
    def of(cls, section, where: str, **override) -> "ClientConfig":
        """From a recipe section with base_url, api_key_env (and optionally api_key, retries, backoff...)."""
        secret = getattr(section, "api_key", None)
        key = secret.get_secret_value() if secret else os.environ.get(section.api_key_env)
        key = (key or "").strip()  # a key from a secret file or .env often ends in a newline
        if any(not c.isprintable() for c in key):  # never echoed: httpx's error would quote it
            raise OptkitError(f"{where}: the API key (${section.api_key_env} or {where}.api_key) contains a "
                              "control character (a line break inside it?); an HTTP header cannot carry it")
        fields = {f: getattr(section, f) for f in ("timeout_s", "max_retries", "backoff_base_s", "backoff_max_s",
                                                   "concurrency") if hasattr(section, f)}
        return cls(base_url=section.base_url.rstrip("/"), where=where, api_key=key or None,
                   api_key_env=section.api_key_env, **{**fields, **override})


class OpenAIClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        for secret in [cfg.api_key, *url_secrets(cfg.base_url)]:
            register_secret(secret)  # from here on, logs and echoed error bodies show *** instead
        self.url = redact_url(cfg.base_url)  # what error lines and manifests may show
        self.reached = False  # any HTTP reply seen: from then on, connection errors are transient
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------------------- one attempt

    async def post_once(self, client, path: str, body: dict) -> tuple[Any, float]:
        """(reply JSON, seconds) or Retryable / PromptFailed / OptkitError (fatal)."""
        import httpx

        started = time.perf_counter()
        try:
            resp = await client.post(endpoint(self.cfg.base_url, path), json=body)
        except httpx.ConnectTimeout:
            if not self.reached:  # nothing ever answered: a wrong address or a firewall, not a slow reply
                raise OptkitError(f"{self.cfg.where}.base_url: cannot reach the endpoint {self.url}: no connection "
                                  f"within {self.cfg.timeout_s:g}s ({self.cfg.where}.timeout_s)") from None
            raise Retryable(f"connect timed out after {self.cfg.timeout_s:g}s", "timeout") from None
        except httpx.TimeoutException:
            raise Retryable(f"timed out after {self.cfg.timeout_s:g}s ({self.cfg.where}.timeout_s)", "timeout") \
                from None
        except httpx.TransportError as exc:
            if not self.reached:
                raise OptkitError(f"{self.cfg.where}.base_url: cannot reach the endpoint {self.url}: "
                                  f"{type(exc).__name__}: {redact_text(str(exc))}") from None
            raise Retryable(f"connection error: {type(exc).__name__}", "connection") from None
        self.reached = True
        self.check_status(resp, path)
        try:
            return resp.json(), time.perf_counter() - started
        except ValueError:
            raise Retryable("malformed reply (not JSON)", "malformed") from None

    def check_status(self, resp, path: str) -> None:
        code, url, where = resp.status_code, redact_url(endpoint(self.cfg.base_url, path)), self.cfg.where
        if code in (401, 403):
            raise OptkitError(f"{where}: {url} rejected the API key (HTTP {code}: {snippet(resp.text)}); "
                              f"check ${self.cfg.api_key_env} or {where}.api_key")
        if code == 402 or (code == 429 and "insufficient_quota" in resp.text):
            # no amount of retrying pays the bill: every prompt would spend all its retries on it
            raise OptkitError(f"{where}: {url} refused for billing (HTTP {code}: {snippet(resp.text)}); check the "
                              "account's quota or credits")
        if code == 404:
            raise OptkitError(f"{where}: {url} answered HTTP 404 ({snippet(resp.text)}): check {where}.base_url "
                              "(usually ends in /v1) and the model name")
        if code in (408, 429) or code >= 500:
            kind = "http_429" if code == 429 else "http_5xx" if code >= 500 else f"http_{code}"
            raise Retryable(f"HTTP {code}", kind, parse_retry_after(resp.headers.get("retry-after")))
        if code >= 400:
            raise PromptFailed(f"HTTP {code}: {snippet(resp.text, 300)}")

    # ------------------------------------------------------------------------------- retries

    def wait_s(self, state) -> float:
        exc = state.outcome.exception()
        if getattr(exc, "retry_after", None) is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER_S)
        ceiling = min(self.cfg.backoff_base_s * 2 ** (state.attempt_number - 1), self.cfg.backoff_max_s)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: retries of many requests spread out

    def before_sleep(self, state) -> None:
        self.stats["retries"] += 1
        self.stats[f"retry_{state.outcome.exception().kind}"] += 1

    async def call(self, client, path: str, body: dict, parse: Callable[[Any, float], Any]) -> tuple[Any, int]:
        """(parse(reply, seconds), attempts), retried; Retryable / PromptFailed once the retries are spent."""
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self.wait_s,
                                 retry=retry_if_exception_type(Retryable), before_sleep=self.before_sleep,
                                 reraise=True)
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    data, seconds = await self.post_once(client, path, body)
                    result = parse(data, seconds)
        except (Retryable, PromptFailed) as exc:
            exc.attempts = attempts  # the caller records how often it was tried
            raise
        return result, attempts

    # ------------------------------------------------------------------------------- many requests

    def session(self):
        import httpx

        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        n = self.cfg.concurrency
        return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.cfg.timeout_s),
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def _run_all(self, items: list, handle: Callable[[Any, Any], Awaitable[None]]) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker(client):
            while not queue.empty():
                await handle(client, queue.get_nowait())

        async with self.session() as client:
            tasks = [asyncio.create_task(worker(client)) for _ in range(min(self.cfg.concurrency, len(items)))]
            try:
                await asyncio.gather(*tasks)
            finally:  # one fatal error (bad key) stops every worker
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def run_all(self, items: list, handle: Callable[[Any, Any], Awaitable[None]]) -> None:
        """handle(http_client, item) for every item, at most `concurrency` at once."""
        if items:
            asyncio.run(self._run_all(items, handle))
