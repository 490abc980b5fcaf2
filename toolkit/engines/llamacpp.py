"""The llamacpp engine: a GGUF file through llama-cpp-python, one request at a time (its Python API does not
batch requests). Prompts are rendered by the source model's tokenizer (toolkit.engines.render) and handed over
as token ids, so a GGUF variant sees exactly the tokens its unquantized source saw; llama.cpp adds no BOS of
its own to a token list. Per-token NLL needs every position's logits: open with logits_all=True.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Optional

from pydantic import Field

from toolkit.engines.base import OnResult, Settings, Timed, timed_from_stamps
from toolkit.engines.render import Renderer, cut_stop
from toolkit.engines.score import nll_from_logits
from toolkit.errors import OptkitError
from toolkit.settings import Section


class LlamaCppSettings(Section):
    """collect.llamacpp: the llamacpp engine as the teacher (one field of the collect section)."""

    gguf: Optional[str] = Field(None, description="The teacher's GGUF file (relative to the recipe file). Default: "
                                "the GGUF a built-in teacher ships (smollm2-135m-instruct: the file its HF weights "
                                "are converted from, so both engines run the same weights). Prompts are rendered "
                                "with teacher.model's tokenizer and chat template, as for every engine.")
    n_ctx: int = Field(2048, ge=16, description="Context window llama.cpp allocates (prompt + new tokens).")
    threads: Optional[int] = Field(None, ge=1, description="llama.cpp threads; default: runtime.threads / "
                                   "OMP_NUM_THREADS, else every core.")


class LlamaCppEngine:
    settings_class = LlamaCppSettings  # collect.llamacpp (toolkit.config.collect adds one field per engine)
    name = "llama.cpp"
    batches = False  # run_batch is sequential: throughput above batch 1 is not measured

    def __init__(self, gguf_path: Path, tok, *, chat_template: bool = True, n_ctx: int = 2048, seed: int = 0,
                 threads: Optional[int] = None, logits_all: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("running a GGUF model", "llama-cpp-python", "gguf") from None
        self.path = Path(gguf_path)
        self.renderer = Renderer(tok, chat_template, f"'{self.path.name}'")
        self.logits_all = logits_all
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, seed=seed, logits_all=logits_all,
                         verbose=False)

    @classmethod
    def load(cls, gguf_path: Path, *, tokenizer_dir, chat_template: bool = True, **kw) -> "LlamaCppEngine":
        from toolkit.models import load_tokenizer

        return cls(gguf_path, load_tokenizer(str(tokenizer_dir)), chat_template=chat_template, **kw)

    # ------------------------------------------------------------------------------- as collect's teacher

    @staticmethod
    def teacher_gguf(recipe) -> Optional[Path]:
        """The teacher's GGUF: collect.llamacpp.gguf, else the file a built-in teacher ships; None if neither."""
        cfg, model = recipe.collect.llamacpp, recipe.teacher.model
        if cfg.gguf:
            path = recipe.resolve_path(cfg.gguf)
            if not path.is_file():
                raise OptkitError(f"collect.llamacpp.gguf: file not found: {path}")
            return path
        from toolkit.models import BUILTINS

        builtin = BUILTINS.get(model)
        if builtin is None or builtin.kind != "causal-lm":
            return None
        spec = importlib.util.find_spec(builtin.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)

    @classmethod
    def _gguf_or_error(cls, recipe) -> Path:
        path = cls.teacher_gguf(recipe)
        if path is None:
            raise OptkitError(f"collect.backend llamacpp: no GGUF for teacher '{recipe.teacher.model}'; set "
                              "collect.llamacpp.gguf (a .gguf file; prompts are rendered with teacher.model's "
                              "tokenizer)")
        return path

    @classmethod
    def for_teacher(cls, recipe) -> "LlamaCppEngine":
        t, cfg = recipe.teacher, recipe.collect.llamacpp
        return cls.load(cls._gguf_or_error(recipe), tokenizer_dir=t.model, chat_template=recipe.data.chat_template,
                        n_ctx=cfg.n_ctx, seed=recipe.seed, threads=cfg.threads or recipe.runtime.threads)

    @classmethod
    def teacher_identity(cls, recipe) -> dict:
        from toolkit.io import sha256_file
        from toolkit.models import model_revision

        t, gguf = recipe.teacher, cls._gguf_or_error(recipe)
        # The GGUF's bytes decide the answers (its quantization type included); the tokenizer renders the prompt.
        return {"backend": "llamacpp", "model": t.model, "revision": model_revision(t.model, t.revision),
                "gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.renderer.prompt(messages).ids

    def context_length(self) -> int:
        return self.llm.n_ctx()

    def _kwargs(self, s: Settings) -> dict:
        kw = {"max_tokens": s.max_new_tokens, "stop": list(s.stop) or None, "seed": s.seed}
        if s.temperature > 0:
            kw.update(temperature=s.temperature, top_p=s.top_p)
        else:
            kw.update(temperature=0.0, top_k=1)
        return kw

    def _one(self, messages: list[dict], s: Settings) -> dict:
        ids = self.prompt_ids(messages)
        self.llm.reset()
        started = time.perf_counter()
        out = self.llm.create_completion(ids, **self._kwargs(s))
        seconds = time.perf_counter() - started
        choice, usage = out["choices"][0], out.get("usage") or {}
        text, cut = cut_stop(choice.get("text") or "", s.stop)
        return {"output": text, "finish_reason": "stop" if cut else (choice.get("finish_reason") or "stop"),
                "input_tokens": len(ids), "output_tokens": int(usage.get("completion_tokens", 0)),
                "latency_s": round(seconds, 6)}

    def run_batch(self, prompts: list[list[dict]], s: Settings) -> tuple[list[dict], float]:
        started = time.perf_counter()
        rows = [self._one(m, s) for m in prompts]
        return rows, time.perf_counter() - started

    def generate(self, prompts: list[list[dict]], s: Settings, batch_size: int = 1,
                 on_result: Optional[OnResult] = None) -> list[Optional[dict]]:
        results: list[Optional[dict]] = []
        for i, m in enumerate(prompts):
            results.append(self._one(m, s))
            if on_result:
                on_result(i, results[-1])
        return results

    def timed(self, messages: list[dict], s: Settings) -> Timed:
        ids = self.prompt_ids(messages)
        self.llm.reset()
        started = time.perf_counter()
        stamps = []
        for chunk in self.llm.create_completion(ids, stream=True, **self._kwargs(s)):
            if chunk["choices"][0].get("text"):  # one chunk per generated token; the last carries only the finish
                stamps.append(time.perf_counter())
        return timed_from_stamps(started, stamps, len(stamps), time.perf_counter())

    def token_nll(self, sequences: list[tuple[list[int], int]]) -> Optional[list[list[float]]]:
        if not self.logits_all:
            return None  # would need logits for every position (open with logits_all=True)
        out = []
        for ids, start in sequences:
            self.llm.reset()
            self.llm.eval(ids)
            out.append(nll_from_logits(self.llm.scores[: len(ids)], ids, start))
        return out

    def memory_bytes(self) -> int:
        return self.path.stat().st_size  # weights are memory-mapped as stored

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
        self.llm = None
