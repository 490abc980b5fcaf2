"""The OpenAI wire format at the gateway: request validation, the cache key space of a request, error bodies,
and the replies / SSE chunks built for cache hits.

Validation is pydantic (extra fields allowed: OpenAI-compatible servers accept many more parameters than the
gateway looks at, and they are passed through unchanged).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

# Fields that do not change the answer; every other field of the body is part of the cache key space, so an
# unknown parameter can only split the cache, never make two different requests share an answer.
NOT_IN_KEY = {"model", "messages", "prompt", "stream", "stream_options", "user"}


class ApiError(Exception):
    """An error reply in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: str
    text: Optional[str] = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[TextPart]]] = None


class _Request(_Open):
    """What both endpoints share. Strict types: a string where a number or a boolean belongs is refused (as the
    OpenAI API does), never coerced here and then forwarded upstream as the string."""
    model: str = Field(min_length=1)
    stream: StrictBool = False
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2)
    top_p: Optional[StrictFloat] = Field(None, ge=0, le=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=16)
    seed: Optional[StrictInt] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # The API documents `stream` and `n` as "or null": null means the default, not a type error.
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in ("stream", "n")):
            data = {k: v for k, v in data.items() if not (k in ("stream", "n") and v is None)}
        return data


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)  # batched prompts (a list) are not routed one by one: refused
    logprobs: Optional[StrictInt] = Field(None, ge=0)
    echo: Optional[StrictBool] = None


def message_text(m: Message) -> str:
    if isinstance(m.content, str):
        return m.content
    return "\n".join(p.text or "" for p in (m.content or []) if p.type == "text")


@dataclass
class Keyed:
    """What the decision path sees of a request: the text the cache and router judge, the namespace it may hit
    in, and whether the cache may serve it / store its answer. templated: None = no template configured, True =
    the query was read out of the template, False = the turn did not match it (decided on whole)."""
    query: str
    namespace: dict
    lookup: bool
    store: bool
    templated: Optional[bool] = None


def _beside_text(m: Message) -> dict:
    """The query turn without its text: images, audio, files and fields such as `name`. They join the key space,
    so a question about one image is never answered from the cache with the answer about another (the cache and
    the router judge the text; the namespace keeps the rest apart)."""
    rest = m.model_dump(exclude_none=True)
    content = rest.pop("content", None)
    if isinstance(content, list):
        rest["parts"] = [p for p in content if p.get("type") != "text"]
    return rest


def wants_logprobs(kind: str, req) -> bool:
    """A request for log-probs is never served from the cache: a cached answer has none to give."""
    if kind == "chat":
        return bool(req.logprobs) or bool(req.top_logprobs)
    return req.logprobs is not None or bool(req.echo)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_same_number(obj), sort_keys=True, ensure_ascii=False,
                                     default=str).encode()).hexdigest()[:24]


def _same_number(obj: Any) -> Any:
    """0 and 0.0 (1 and 1.0) are one value to the model: one spelling in the key, or the cache splits."""
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, dict):
        return {k: _same_number(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_same_number(v) for v in obj]
    return obj


def keyed(kind: str, req: Union[ChatRequest, CompletionRequest], body: dict, tenant: str, model_name: str,
          policy, no_cache: bool, no_store: bool, decision=None) -> Keyed:
    """The cache key space (tenant, served model, conversation context incl. system prompt, answer-changing
    parameters) and the query: the last user message or the prompt -- or, with `decision` (DecisionText), the
    prompt column read out of it when it is the recipe's template filled in (what routers and caches were fit on;
    the template and its other fields then join the key space)."""
    if kind == "chat":
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        last = users[-1] if users else len(req.messages) - 1
        query = message_text(req.messages[last])
        context = [m.model_dump(exclude_none=True) for i, m in enumerate(req.messages) if i != last]
        context.append({"query_at": last, "rest": _beside_text(req.messages[last])})
    else:
        query, context = req.prompt, []
    templated = None
    if decision is not None:
        found = decision.extract(query)
        templated = found is not None
        if found is not None:
            query = found[0]
            context.append({"template": decision.id, "fields": found[1]})
    params = {k: v for k, v in body.items() if k not in NOT_IN_KEY}
    temperature = req.temperature if req.temperature is not None else policy.default_temperature
    params["temperature"] = temperature  # absent and the default are the same request
    namespace = {"tenant": tenant, "model": model_name, "kind": kind, "context": _digest(context),
                 "params": _digest(params)}
    cacheable = (policy.enabled and req.n == 1 and bool(query.strip()) and not wants_logprobs(kind, req)
                 and (temperature == 0 or policy.cache_sampled))
    return Keyed(query, namespace, cacheable and not no_cache, cacheable and not no_store, templated)


def tenant_of(headers, tenant_header: Optional[str]) -> str:
    """A trusted tenant header when configured, else a hash of the client's API key (never the key itself)."""
    if tenant_header and headers.get(tenant_header):
        return "h:" + headers[tenant_header][:200]
    auth = headers.get("authorization", "")
    if auth:
        return "k:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return "anonymous"


class ClientKeys:
    """The API keys clients must send (`api_keys_env`: comma-separated, in the environment, never in a file),
    kept as digests and compared in constant time. None configured = an open gateway (behind a proxy that
    authenticates)."""

    def __init__(self, env: Optional[str]):
        self.digests: list[bytes] = []
        if env is None:
            return
        from toolkit.errors import OptkitError
        from toolkit.runtime import register_secret

        keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
        if not keys:  # fail closed: a typo in the variable's name must not open the gateway
            raise OptkitError(f"serve config: api_keys_env is {env}, but ${env} holds no key (comma-separated)")
        for k in keys:
            register_secret(k)
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, headers) -> None:
        if not self.digests:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not any(hmac.compare_digest(digest, d) for d in self.digests):  # the key is never echoed
            raise ApiError(401, "incorrect API key", code="invalid_api_key")


def cache_control(headers) -> tuple[bool, bool]:
    """(no_cache, no_store) from the request's Cache-Control."""
    tokens = {t.strip().lower() for t in headers.get("cache-control", "").split(",")}
    return "no-cache" in tokens or "no-store" in tokens, "no-store" in tokens


# ------------------------------------------------------------------------------------------ answers


def answer_of(kind: str, reply: dict) -> Optional[dict]:
    """The cacheable answer of a backend reply: one complete choice with text, else None."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    c = choices[0]
    text = (c.get("message") or {}).get("content") if kind == "chat" else c.get("text")
    if not isinstance(text, str) or c.get("finish_reason") not in ("stop", "length"):
        return None
    return {"text": text, "finish_reason": c["finish_reason"]}


class Feedback(BaseModel):
    """POST /v1/feedback: the application's verdict on a response the gateway served."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    correct: StrictBool


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def cached_reply(kind: str, answer: dict, model: str, rid: Optional[str] = None) -> dict:
    rid, now = rid or new_id(kind), int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # no model ran
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                  "finish_reason": answer["finish_reason"]}
        return {"id": rid, "object": "chat.completion", "created": now, "model": model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": answer["text"], "finish_reason": answer["finish_reason"], "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": now, "model": model,
            "choices": [choice], "usage": usage}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def reply_chunks(kind: str, reply: dict, usage: bool = False) -> list[bytes]:
    """A complete reply as the OpenAI stream of it: per choice its role, its content (with tool calls and
    log-probs when it has them) and its finish; the usage chunk when the client asked for one; [DONE]. Used for
    cache hits and for cascade replies, whose answer is complete before the first byte goes out."""
    head = {"id": reply.get("id") or new_id(kind), "created": reply.get("created") or int(time.time()),
            "model": reply.get("model")}
    events: list[dict] = []
    for i, c in enumerate(reply.get("choices") or []):
        index, finish = c.get("index", i), c.get("finish_reason")
        if kind == "chat":
            msg = c.get("message") or {}
            delta = {k: v for k, v in msg.items() if k not in ("role", "tool_calls") and v is not None}
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": j, **tc} for j, tc in enumerate(msg["tool_calls"])]
            chunk = {"index": index, "delta": delta, "finish_reason": None}
            if c.get("logprobs") is not None:
                chunk["logprobs"] = c["logprobs"]
            events += [{"index": index, "delta": {"role": msg.get("role") or "assistant", "content": ""},
                        "finish_reason": None}, chunk, {"index": index, "delta": {}, "finish_reason": finish}]
        else:
            events += [{"index": index, "text": c.get("text") or "", "finish_reason": None,
                        "logprobs": c.get("logprobs")},
                       {"index": index, "text": "", "finish_reason": finish, "logprobs": None}]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    out = [sse({**head, "object": obj, "choices": [e]}) for e in events]
    if usage:
        out.append(sse({**head, "object": obj, "choices": [], "usage": reply.get("usage")}))
    return out + [DONE]


def cached_chunks(kind: str, answer: dict, model: str, rid: Optional[str] = None, usage: bool = False) -> list[bytes]:
    """A cached answer as an OpenAI stream: role, content, finish, [usage], [DONE]."""
    return reply_chunks(kind, cached_reply(kind, answer, model, rid), usage)


class StreamAnswer:
    """Collects a backend's SSE stream into the answer it streamed; complete only after a finish_reason and
    [DONE] (a cut-off stream is never cached)."""

    def __init__(self, kind: str):
        self.kind, self.parts, self.finish, self.done, self.choices = kind, [], None, False, set()
        self.id: Optional[str] = None  # the response id the stream carries (for /v1/feedback)

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if self.id is None and isinstance(event, dict) and isinstance(event.get("id"), str):
            self.id = event["id"]
        for c in event.get("choices") or []:
            self.choices.add(c.get("index", 0))
            text = (c.get("delta") or {}).get("content") if self.kind == "chat" else c.get("text")
            if isinstance(text, str):
                self.parts.append(text)
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]

    def answer(self) -> Optional[dict]:
        if not self.done or self.finish not in ("stop", "length") or len(self.choices) != 1:
            return None
        return {"text": "".join(self.parts), "finish_reason": self.finish}
