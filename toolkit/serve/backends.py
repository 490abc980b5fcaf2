"""The gateway's view of one OpenAI-compatible backend: bounded concurrency, deadline-aware retries, a circuit
breaker, and the fallback chain across backends.

Why not toolkit.engines' batch client: a gateway call has a hard per-request deadline (a batch run waits up to
10 minutes on a Retry-After), must fall back instead of stopping on an unreachable endpoint, and streams. It
shares that client's Retry-After parsing and its error-body redaction.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import httpx

from toolkit.config.serve import BackendConfig
from toolkit.engines.openai_client import parse_retry_after, snippet
from toolkit.redact import redact_url
from toolkit.runtime import register_secret


class BackendError(Exception):
    """A backend call failed (another backend may still answer it). `health`: what the failure says about the
    backend, for its breaker: False = it failed, True = it answered (refusing the request), None = nothing (its own
    slots were all busy)."""

    def __init__(self, backend: str, reason: str, message: str, status: Optional[int] = None,
                 retry_after: Optional[float] = None, health: Optional[bool] = False):
        super().__init__(message)
        self.backend, self.reason, self.status = backend, reason, status
        self.retry_after, self.health = retry_after, health


class Breaker:
    """Closed -> open after `failures` consecutive failures; open sends traffic elsewhere for `cooldown_s`, then
    lets one trial request through (half-open): its success closes the breaker, its failure re-opens it. A trial
    that never reports back (its client went away) is replaced by another after a further cooldown."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.failures, self.opened_at, self.trial_at = 0, None, None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "half-open" and (self.trial_at is None or self.clock() - self.trial_at >= self.cooldown_s):
            self.trial_at = self.clock()  # one trial in flight
            return True
        return state == "closed"

    def success(self) -> None:
        self.failures, self.opened_at, self.trial_at = 0, None, None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.limit or self.trial_at is not None:
            self.opened_at, self.trial_at = self.clock(), None


def _classify(name: str, resp: httpx.Response) -> Optional[BackendError]:
    """None for a 2xx reply; else the error it stands for."""
    code = resp.status_code
    if code < 400:
        return None
    body = snippet(resp.text)
    if code == 429 or code >= 500 or code == 408:
        return BackendError(name, "http_429" if code == 429 else f"http_{code // 100}xx", f"HTTP {code}: {body}",
                            code, parse_retry_after(resp.headers.get("retry-after")))
    # 400/413/422: this backend refused the request, yet another may take it -- the commonest 400 is a prompt
    # longer than a small student's context, which the teacher accepts; the backend itself is alive. 401/403/404:
    # this backend's configuration is wrong. Either way the fallback may still answer.
    return BackendError(name, f"http_{code}", f"HTTP {code}: {body}", code, health=code in (400, 413, 422))


class Backend:
    """One backend: `await post(path, body, deadline)` or `async with stream(path, body, deadline) as resp`."""

    def __init__(self, name: str, cfg: BackendConfig):
        self.name, self.cfg = name, cfg
        self.url = cfg.base_url.rstrip("/")
        self.shown_url = redact_url(self.url)
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        register_secret(key)  # from here on the process's redaction masks it
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        n = cfg.max_concurrency
        self.client = httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=n,
                                                                             max_keepalive_connections=n))
        # Readiness probes get their own connection: on a backend whose slots are all busy (it is working) a probe
        # through the request pool would wait for one, time out and call the backend down.
        self.probe = httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=1))
        self.slots = asyncio.Semaphore(n)
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.probe.aclose()

    def _timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendError(self.name, "deadline", "the request deadline passed before this backend was tried")
        return min(self.cfg.timeout_s, left)

    async def _attempt(self, send: Callable[[float], Awaitable[Any]], deadline: float) -> Any:
        """One call within this backend's deadline; transport problems become BackendError."""
        try:
            return await send(self._timeout(deadline))
        except httpx.TimeoutException:
            raise BackendError(self.name, "timeout", f"no reply within {self.cfg.timeout_s:g}s "
                               f"(backends.{self.name}.timeout_s)") from None
        except httpx.ConnectError:
            # Nothing listens: retrying the same dead port only burns the deadline; fall back at once.
            raise BackendError(self.name, "down", f"cannot connect to {self.shown_url}") from None
        except httpx.TransportError as exc:
            raise BackendError(self.name, "dropped", f"connection dropped ({type(exc).__name__})") from None

    async def _retrying(self, send: Callable[[float], Awaitable[Any]], deadline: float) -> Any:
        """`send` retried on 429 / 5xx / dropped connections, honouring Retry-After, never past the deadline."""
        from tenacity import AsyncRetrying, retry_if_exception

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, BackendError) and (exc.reason in ("dropped", "http_429", "http_5xx"))

        def wait(state) -> float:
            exc = state.outcome.exception()
            if exc.retry_after is not None:
                return exc.retry_after
            return self.cfg.backoff_s * 2 ** (state.attempt_number - 1)

        def stop(state) -> bool:  # runs after wait: give up when the next try could not finish in time
            return (state.attempt_number > self.cfg.retries
                    or time.monotonic() + (state.upcoming_sleep or 0) >= deadline)

        async for attempt in AsyncRetrying(retry=retry_if_exception(retryable), wait=wait, stop=stop,
                                           reraise=True):
            with attempt:
                return await self._attempt(send, deadline)

    async def _slot(self, deadline: float, queue_s: Optional[float]) -> None:
        """A free slot, waiting at most queue_s (a fallback can take the request sooner) and never past the
        deadline."""
        wait = deadline - time.monotonic() if queue_s is None else min(queue_s, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self.slots.acquire(), max(wait, 0.001))
        except asyncio.TimeoutError:
            raise BackendError(self.name, "busy", f"all {self.cfg.max_concurrency} slots stayed busy for "
                               f"{wait:.3g}s", health=None) from None

    async def post(self, path: str, body: dict, deadline: float, queue_s: Optional[float] = None
                   ) -> tuple[dict, float]:
        """(reply JSON, seconds) of a non-streaming call."""
        async def send(timeout: float):
            resp = await self.client.post(self.url + path, json=body, timeout=timeout)
            err = _classify(self.name, resp)
            if err:
                raise err
            try:
                return resp.json()
            except ValueError:
                raise BackendError(self.name, "http_5xx", "malformed reply (not JSON)") from None

        await self._slot(deadline, queue_s)
        started = time.monotonic()
        try:
            return await self._retrying(send, deadline), time.monotonic() - started
        finally:
            self.slots.release()

    @asynccontextmanager
    async def stream(self, path: str, body: dict, deadline: float, queue_s: Optional[float] = None
                     ) -> AsyncIterator[httpx.Response]:
        """An open streaming reply whose status was 2xx; errors before the first byte raise BackendError (so the
        caller can still fall back), later ones surface while reading."""
        async def send(timeout: float):
            req = self.client.build_request("POST", self.url + path, json=body, timeout=timeout)
            resp = await self.client.send(req, stream=True)
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
                raise _classify(self.name, resp)
            return resp

        await self._slot(deadline, queue_s)
        try:
            resp = await self._retrying(send, deadline)
            try:
                yield resp
            finally:
                await resp.aclose()
        finally:
            self.slots.release()

    async def reachable(self, timeout: float = 2.0) -> bool:
        try:
            resp = await self.probe.get(self.url + "/models", timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code < 500


class Pool:
    """All backends by name, and the fallback chain: `await pool.run(name, call, deadline)`."""

    def __init__(self, configs: dict[str, BackendConfig], on_fallback: Callable[[str, str, str], None]):
        self.backends = {name: Backend(name, cfg) for name, cfg in configs.items()}
        self.on_fallback = on_fallback  # (from, to, reason): metrics and the response header

    async def aclose(self) -> None:
        for b in self.backends.values():
            await b.aclose()

    def by_model(self, model: str) -> Optional[Backend]:
        return next((b for b in self.backends.values() if b.cfg.model == model), None)

    async def run(self, name: str, call: Callable[[Backend, Optional[float]], Awaitable[Any]], deadline: float,
                  fallback: bool = True) -> tuple[Any, str, list[str]]:
        """(call's result, backend that answered, fallbacks taken as 'from->to:reason'). `call(backend, queue_s)`
        waits at most queue_s for one of the backend's slots (None: within the deadline)."""
        taken: list[str] = []
        seen: set[str] = set()
        while True:
            backend = self.backends[name]
            seen.add(name)
            nxt = backend.cfg.fallback if fallback and backend.cfg.fallback not in seen else None
            if nxt is not None and not backend.breaker.allow():
                taken.append(self._fall(name, nxt, "breaker_open"))
                name = nxt
                continue
            try:
                result = await call(backend, None if nxt is None else backend.cfg.queue_timeout_s)
            except BackendError as exc:
                # A refused request (400) still shows a live backend, busy slots show nothing: only real failures
                # count against it.
                if exc.health is not None:
                    (backend.breaker.success if exc.health else backend.breaker.failure)()
                if nxt is None or time.monotonic() >= deadline:
                    raise
                taken.append(self._fall(name, nxt, exc.reason))
                name = nxt
                continue
            backend.breaker.success()
            return result, name, taken

    def _fall(self, src: str, dst: str, reason: str) -> str:
        self.on_fallback(src, dst, reason)
        return f"{src}->{dst}:{reason}"
