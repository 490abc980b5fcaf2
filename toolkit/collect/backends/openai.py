"""The openai backend: any OpenAI-compatible endpoint (OpenAI, vLLM serve, TGI, llama.cpp server).

httpx async with at most `concurrency` requests in flight. Retried (tenacity, exponential backoff with
jitter, a server's Retry-After wins): 429, 408, 5xx, timeouts, dropped connections, malformed replies.
Not retried: 401/403 (a bad key stops the stage at once), 404 (wrong base_url or model: every prompt would
fail the same way), and an endpoint that cannot be reached before any reply came back. Other 4xx replies
fail only their prompt (e.g. a prompt longer than the context).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections import Counter
from typing import Any, Optional

from toolkit.collect.backends import Request, Sink
from toolkit.collect.prompts import render_plain
from toolkit.config import Recipe
from toolkit.errors import OptkitError
from toolkit.runtime import redact, register_secret

log = logging.getLogger("optkit.collect")

MAX_RETRY_AFTER_S = 600.0  # honor a server's Retry-After, but not an absurd one


class Retryable(Exception):
    def __init__(self, message: str, kind: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind  # counted in the summary: http_429, http_5xx, timeout, connection, malformed
        self.retry_after = retry_after


class PromptFailed(Exception):
    """This prompt cannot succeed as sent (a 4xx other than auth/404); others may."""


def snippet(text: str, n: int = 160) -> str:
    """A server's error body as one short redacted line (error messages stay one line)."""
    return " ".join(redact(text[:n]).split())


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


class OpenAIBackend:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.collect.openai
        self.gen = recipe.collect.generation
        self.k = recipe.collect.top_logprobs
        self.model_name = self.cfg.model or recipe.teacher.model
        self.base_url = self.cfg.base_url.rstrip("/")
        key = self.cfg.api_key.get_secret_value() if self.cfg.api_key else os.environ.get(self.cfg.api_key_env)
        self.api_key = key or None
        register_secret(self.api_key)  # from here on, logs show *** instead
        self.reached = False  # any HTTP reply seen: from then on, connection errors are transient
        self.stats: Counter = Counter()
        self.vocab: Optional[dict[str, int]] = None

    def identity(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model_name}

    # ----------------------------------------------------------------------------------- request / reply

    def path(self) -> str:
        return "/chat/completions" if self.cfg.api == "chat" else "/completions"

    def body(self, messages: list[dict]) -> dict:
        g = self.gen
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": g.max_new_tokens,
                                "temperature": g.temperature, "top_p": g.top_p}
        if self.cfg.api == "chat":
            body["messages"] = messages
            if self.k:
                body.update(logprobs=True, top_logprobs=self.k)
        else:
            body["prompt"] = render_plain(messages)
            if self.k:
                body["logprobs"] = self.k
        if g.stop:
            body["stop"] = list(g.stop)
        if g.temperature > 0:
            body["seed"] = self.recipe.seed
        return body

    def parse(self, data: Any, latency: float) -> dict:
        """A reply body -> result dict; anything unexpected is a malformed reply (retried)."""
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.cfg.api == "chat" else choice["text"]
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise Retryable(f"malformed reply (no {exc} in the JSON)", "malformed") from None
        text = text or ""
        result = {"output": text, "finish_reason": choice.get("finish_reason") or "stop",
                  "input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens"),
                  "latency_s": round(latency, 6)}
        if result["input_tokens"] is None or result["output_tokens"] is None:
            # No usage block (some servers): a rough 4-characters-per-token estimate, flagged as such.
            result.update(input_tokens=result["input_tokens"] or 0,
                          output_tokens=result["output_tokens"] or max(1, len(text) // 4), tokens_estimated=True)
            self.stats["tokens_estimated"] += 1
        if self.k:
            topk = self.parse_logprobs(choice.get("logprobs"))
            if topk is None:
                self.stats["missing_logprobs"] += 1
            else:
                result["topk"] = topk
        return result

    def parse_logprobs(self, lp: Any) -> Optional[dict]:
        """Top-k per output position as token ids (via the teacher tokenizer) and log-probs."""
        if not lp:
            return None
        if self.cfg.api == "chat":
            positions = [{t["token"]: t["logprob"] for t in (pos.get("top_logprobs") or [])}
                         for pos in (lp.get("content") or [])]
        else:
            positions = [dict(d or {}) for d in (lp.get("top_logprobs") or [])]
        if not positions:
            return None
        ids, lps = [], []
        for pos in positions:
            best = sorted(pos.items(), key=lambda kv: -kv[1])[:self.k]
            row_ids = [self.token_id(tok) for tok, _ in best] + [-1] * (self.k - len(best))
            row_lps = [float(v) for _, v in best] + [float("-inf")] * (self.k - len(best))
            ids.append(row_ids)
            lps.append(row_lps)
        return {"ids": ids, "logprobs": lps}

    def token_id(self, token: str) -> int:
        """Servers return token strings; the student needs ids in the teacher vocabulary (-1 = not found)."""
        if self.vocab is None:
            from toolkit.models import load_tokenizer

            t = self.recipe.teacher
            try:
                tok = load_tokenizer(t.model, t.revision, t.trust_remote_code)
            except OptkitError as exc:
                raise OptkitError(f"collect.top_logprobs > 0 with the openai backend maps tokens to ids with the "
                                  f"teacher's tokenizer, which cannot be loaded: {exc}") from None
            vocab: dict[str, int] = {}
            for i, text in enumerate(tok.batch_decode([[i] for i in range(len(tok))])):
                vocab.setdefault(text, i)  # a string several ids decode to maps to the lowest id
            self.vocab = vocab
        found = self.vocab.get(token, -1)
        if found < 0:
            self.stats["unmapped_tokens"] += 1
        return found

    async def request_once(self, client, messages: list[dict]) -> dict:
        import httpx

        url = self.base_url + self.path()
        started = time.perf_counter()
        try:
            resp = await client.post(url, json=self.body(messages))
        except httpx.TimeoutException:
            raise Retryable(f"timed out after {self.cfg.timeout_s:g}s (collect.openai.timeout_s)", "timeout") from None
        except httpx.TransportError as exc:
            if not self.reached:
                raise OptkitError(f"cannot reach the endpoint {self.base_url} (collect.openai.base_url): "
                                  f"{type(exc).__name__}: {exc}") from None
            raise Retryable(f"connection error: {type(exc).__name__}: {exc}", "connection") from None
        self.reached = True
        latency = time.perf_counter() - started
        code = resp.status_code
        if code in (401, 403):
            raise OptkitError(f"{url} rejected the API key (HTTP {code}: {snippet(resp.text)}); check "
                              f"${self.cfg.api_key_env} or collect.openai.api_key")
        if code == 404:
            raise OptkitError(f"{url} answered HTTP 404 ({snippet(resp.text)}): check "
                              f"collect.openai.base_url (usually ends in /v1) and the model name '{self.model_name}'")
        if code == 429 or code == 408 or code >= 500:
            kind = "http_429" if code == 429 else "http_5xx" if code >= 500 else f"http_{code}"
            raise Retryable(f"HTTP {code}", kind, parse_retry_after(resp.headers.get("retry-after")))
        if code >= 400:
            raise PromptFailed(f"HTTP {code}: {snippet(resp.text, 300)}")
        try:
            data = resp.json()
        except ValueError:
            raise Retryable("malformed reply (not JSON)", "malformed") from None
        return self.parse(data, latency)

    # ----------------------------------------------------------------------------------- retries, workers

    def wait_s(self, state) -> float:
        exc = state.outcome.exception()
        if getattr(exc, "retry_after", None) is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER_S)
        ceiling = min(self.cfg.backoff_base_s * 2 ** (state.attempt_number - 1), self.cfg.backoff_max_s)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: retries of many prompts spread out

    def before_sleep(self, state) -> None:
        self.stats["retries"] += 1
        self.stats[f"retry_{state.outcome.exception().kind}"] += 1

    async def answer(self, client, request: Request, sink: Sink) -> None:
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self.wait_s,
                                 retry=retry_if_exception_type(Retryable), before_sleep=self.before_sleep,
                                 reraise=True)
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = await self.request_once(client, request.messages)
        except (Retryable, PromptFailed) as exc:
            sink.failed(request, str(exc), attempts)
            return
        sink.done(request, result)

    async def worker(self, client, queue: asyncio.Queue, sink: Sink) -> None:
        while True:
            try:
                request = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await self.answer(client, request, sink)

    async def run(self, requests: list[Request], sink: Sink) -> None:
        import httpx

        queue: asyncio.Queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits) as client:
            tasks = [asyncio.create_task(self.worker(client, queue, sink))
                     for _ in range(min(self.cfg.concurrency, len(requests)))]
            try:
                await asyncio.gather(*tasks)
            finally:  # one fatal error (bad key) stops every worker
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def generate(self, requests: list[Request], sink: Sink) -> None:
        if requests:
            asyncio.run(self.run(requests, sink))

    def close(self) -> None:
        pass
