"""Teacher backends: who turns prompts into answers. A plain dict registry, modules imported on use.

A backend takes `Request`s and reports each answer to a `Sink` as soon as it has it (so the result store
can persist it before the next one arrives). A result is a dict:

    output, finish_reason ("stop" | "length" | ...), input_tokens, output_tokens, latency_s,
    and optionally topk = {"ids": [[int] * k] * T, "logprobs": [[float] * k] * T}.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from toolkit.config import Recipe

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "hf": "toolkit.collect.backends.hf:HFBackend",
    "openai": "toolkit.collect.backends.openai:OpenAIBackend",
    "vllm": "toolkit.collect.backends.vllm:VLLMBackend",
}


@dataclass(frozen=True)
class Request:
    key: str  # result-store key
    id: str  # prompt id (for messages and failure records)
    messages: list


class Sink(Protocol):
    def done(self, request: Request, result: dict) -> None: ...
    def failed(self, request: Request, error: str, attempts: int) -> None: ...


class Backend(Protocol):
    def identity(self) -> dict:
        """What, besides messages and generation params, decides the answers (model, revision, endpoint)."""

    def generate(self, requests: list[Request], sink: Sink) -> None: ...

    def close(self) -> None: ...


def backend_class(name: str) -> type:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, recipe: Recipe) -> Backend:
    return backend_class(name)(recipe)


def generation_params(recipe: Recipe) -> dict:
    """The settings that change an answer; part of the result-store key."""
    cfg = recipe.collect
    gen = cfg.generation
    params = {**gen.model_dump(), "top_logprobs": cfg.top_logprobs, "chat_template": recipe.data.chat_template}
    if gen.temperature > 0:  # sampled answers depend on the seed; greedy ones do not
        params["seed"] = recipe.seed
    if cfg.backend == "openai":
        params["api"] = cfg.openai.api
    return params
