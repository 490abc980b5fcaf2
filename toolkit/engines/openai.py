"""The openai engine: any OpenAI-compatible endpoint through the one client (toolkit.engines.openai_client).

/chat/completions sends the messages (the server applies its chat template); /completions sends the plain
rendering. Token ids are not the server's to give: prompt lengths for the context guard and top-k log-probs
are mapped with the teacher's tokenizer when it can be loaded. No per-token NLL (the API does not score
given text), and no streaming: a timed request's TTFT is its end-to-end time.

Crash semantics: up to `concurrency` requests are in flight at once. After a kill -9 their answers never
reached collect's result store, so the next run sends them again (the server may have answered and billed
them once already); `on_start` lets collect log them (work/in_flight.log) and count them in summary.json and
the manifest as `resent_after_interrupt`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, Optional

from pydantic import Field, SecretStr

from toolkit.engines.base import OnResult, Settings, Timed
from toolkit.engines.openai_client import ClientConfig, OpenAIClient, PromptFailed, Retryable
from toolkit.engines.render import Renderer, cut_stop, render_plain
from toolkit.errors import OptkitError
from toolkit.io import without_surrogates
from toolkit.settings import Section


class OpenAISettings(Section):
    """collect.openai: the openai engine as the teacher (one field of the collect section)."""

    base_url: str = Field("https://api.openai.com/v1", description="Endpoint root of any OpenAI-compatible "
                          "server (OpenAI, vLLM serve, TGI, llama.cpp server).")
    model: Optional[str] = Field(None, description="Model name sent to the endpoint; default = teacher.model.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key: Optional[SecretStr] = Field(None, json_schema_extra={"secret": True},
                                         description="API key inline (prefer api_key_env). Never logged.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, description="Retries on 429 / 5xx / timeouts / malformed replies.")
    backoff_base_s: float = Field(0.5, ge=0, description="First retry wait; doubles each try (Retry-After wins).")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest single wait between retries.")
    api: Literal["chat", "completions"] = Field("chat", description="/chat/completions or /completions.")
    context_length: Optional[int] = Field(None, ge=1, description="The served model's context in tokens, for "
                                          "collect.context (prompts counted with the teacher's tokenizer); "
                                          "null = not checked.")


class OpenAIEngine:
    settings_class = OpenAISettings  # collect.openai (toolkit.config.collect adds one field per engine)
    name = "openai"
    batches = False

    def __init__(self, client: ClientConfig, model: str, *, api: str = "chat", tokenizer_ref: Optional[str] = None,
                 chat_template: bool = True, context_length: Optional[int] = None):
        self.client = OpenAIClient(client)
        self.model_name, self.api = model, api
        self.tokenizer_ref, self.chat_template, self._context = tokenizer_ref, chat_template, context_length
        self._renderer: Optional[Renderer] = None
        self.vocab: Optional[dict[str, int]] = None
        self.stats = self.client.stats

    @classmethod
    def for_teacher(cls, recipe) -> "OpenAIEngine":
        cfg = recipe.collect.openai
        return cls(ClientConfig.of(cfg, "collect.openai"), cfg.model or recipe.teacher.model, api=cfg.api,
                   tokenizer_ref=recipe.teacher.model, chat_template=recipe.data.chat_template,
                   context_length=cfg.context_length)

    @staticmethod
    def teacher_identity(recipe) -> dict:
        from toolkit.redact import redact_url

        cfg = recipe.collect.openai
        return {"backend": "openai", "base_url": redact_url(cfg.base_url.rstrip("/")),
                "model": cfg.model or recipe.teacher.model}

    # ------------------------------------------------------------------------------- tokens (optional)

    @property
    def renderer(self) -> Renderer:
        """The teacher's tokenizer, for counting prompt tokens (collect.context) and mapping top-k tokens."""
        if self._renderer is None:
            from toolkit.models import load_tokenizer

            try:
                tok = load_tokenizer(self.tokenizer_ref)
            except OptkitError as exc:
                raise OptkitError(f"collect.openai.context_length / collect.top_logprobs > 0 with the openai "
                                  f"backend count tokens with the teacher's tokenizer, which cannot be loaded: {exc}") \
                    from None
            self._renderer = Renderer(tok, self.chat_template and self.api == "chat" and bool(tok.chat_template),
                                      f"'{self.tokenizer_ref}'")
        return self._renderer

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.renderer.prompt(messages).ids

    def context_length(self) -> Optional[int]:
        return self._context

    def token_id(self, token: str) -> int:
        """Servers return token strings; the student needs ids in the teacher vocabulary (-1 = not found)."""
        if self.vocab is None:
            tok = self.renderer.tok
            vocab: dict[str, int] = {}
            for i, text in enumerate(tok.batch_decode([[i] for i in range(len(tok))])):
                vocab.setdefault(text, i)  # a string several ids decode to maps to the lowest id
            self.vocab = vocab
        found = self.vocab.get(token, -1)
        if found < 0:
            self.stats["unmapped_tokens"] += 1
        return found

    # ------------------------------------------------------------------------------- request / reply

    def path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"

    def completion_prompt(self, messages: list[dict]) -> Any:
        """What /completions gets as `prompt`: the plain rendering (the server tokenizes it and adds its BOS)."""
        return render_plain(messages)

    def body(self, messages: list[dict], s: Settings) -> dict:
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p}
        if self.api == "chat":
            body["messages"] = messages
            if s.top_logprobs:
                body.update(logprobs=True, top_logprobs=s.top_logprobs)
        else:
            body["prompt"] = self.completion_prompt(messages)
            if s.top_logprobs:
                body["logprobs"] = s.top_logprobs
        if s.stop:
            body["stop"] = list(s.stop)
        if s.temperature > 0:
            body["seed"] = s.seed
        return body

    def parse(self, data: Any, latency: float, s: Settings, messages: Optional[list[dict]] = None) -> dict:
        """A reply body -> result dict; anything unexpected is a malformed reply (retried). `messages`: what was
        sent, for a token estimate when the server reports no usage."""
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise Retryable(f"malformed reply (no {exc} in the JSON)", "malformed") from None
        if not isinstance(text, str):  # null content: a content filter, a refusal or tool calls, not an answer
            raise PromptFailed(f"no text in the reply (finish_reason {choice.get('finish_reason')!r})")
        text, cut = cut_stop(without_surrogates(text or ""), s.stop)
        result = {"output": text, "finish_reason": "stop" if cut else (choice.get("finish_reason") or "stop"),
                  "input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens"),
                  "latency_s": round(latency, 6)}
        if result["input_tokens"] is None or result["output_tokens"] is None:
            # No usage block (some servers): a rough 4-characters-per-token estimate, flagged as such. Input tokens
            # too: they usually dominate the bill, and 0 made evaluate's teacher cost look cheap.
            sent = sum(len(str(m.get("content") or "")) for m in messages or [])
            result.update(input_tokens=result["input_tokens"] or max(1, sent // 4),
                          output_tokens=result["output_tokens"] or max(1, len(text) // 4), tokens_estimated=True)
            self.stats["tokens_estimated"] += 1
        if s.top_logprobs:
            topk = self.parse_logprobs(choice.get("logprobs"), s.top_logprobs)
            if topk is None:
                self.stats["missing_logprobs"] += 1
            else:
                result["topk"] = topk
        return result

    def parse_logprobs(self, lp: Any, k: int) -> Optional[dict]:
        """Top-k per output position as token ids (via the teacher tokenizer) and log-probs."""
        if not lp:
            return None
        if self.api == "chat":
            positions = [{t["token"]: t["logprob"] for t in (pos.get("top_logprobs") or [])}
                         for pos in (lp.get("content") or [])]
        else:
            positions = [dict(d or {}) for d in (lp.get("top_logprobs") or [])]
        if not positions:
            return None
        ids, lps = [], []
        for pos in positions:
            best = sorted(pos.items(), key=lambda kv: -kv[1])[:k]
            ids.append([self.token_id(tok) for tok, _ in best] + [-1] * (k - len(best)))
            lps.append([float(v) for _, v in best] + [float("-inf")] * (k - len(best)))
        return {"ids": ids, "logprobs": lps}

    # ------------------------------------------------------------------------------- the interface

    def generate(self, prompts: list[list[dict]], s: Settings, batch_size: int = 0,
                 on_result: Optional[OnResult] = None, on_failed: Optional[Callable[[int, str, int], None]] = None,
                 on_start: Optional[Callable[[int], None]] = None) -> list[Optional[dict]]:
        """Answers in input order (None for a request that failed after its retries); `concurrency` in flight.
        on_start(i) runs before request i is first sent, on_failed(i, error, attempts) when it gave up."""
        results: list[Optional[dict]] = [None] * len(prompts)

        async def handle(http, i: int) -> None:
            if on_start:
                on_start(i)
            try:
                results[i], _ = await self.client.call(http, self.path(), self.body(prompts[i], s),
                                                       lambda data, sec: self.parse(data, sec, s, prompts[i]))
            except (Retryable, PromptFailed) as exc:
                if on_failed:
                    on_failed(i, str(exc), exc.attempts)
                return
            if on_result:
                on_result(i, results[i])

        self.client.run_all(list(range(len(prompts))), handle)
        return results

    def run_batch(self, prompts: list[list[dict]], s: Settings) -> tuple[list[dict], float]:
        started = time.perf_counter()
        rows = self.generate(prompts, s)
        return [r for r in rows if r is not None], time.perf_counter() - started

    def timed(self, messages: list[dict], s: Settings) -> Timed:
        started = time.perf_counter()
        (row,) = self.generate([messages], s)
        e2e = time.perf_counter() - started
        return Timed(ttft_s=e2e, e2e_s=e2e, output_tokens=int((row or {}).get("output_tokens") or 0))

    def token_nll(self, sequences) -> None:
        return None

    def memory_bytes(self) -> None:
        return None

    def close(self) -> None:
        pass
