"""The vllm backend: offline `vllm.LLM.generate` (GPU; the `gpu` extra).

vLLM schedules its own continuous batches, so we hand it chunks of prompts and persist each chunk's answers
before the next (a crash loses at most one chunk). The pure parts (SamplingParams arguments, RequestOutput ->
result) are separate functions so they are testable without a GPU.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from toolkit.collect.backends import Request, Sink
from toolkit.collect.prompts import render_plain
from toolkit.config import GenerationConfig, Recipe
from toolkit.errors import MissingExtraError

CHUNK = 512  # prompts per LLM.generate call: large enough for vLLM's batching, small enough to lose little


def sampling_kwargs(gen: GenerationConfig, top_logprobs: int, seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p,
                          "n": 1}
    if gen.stop:
        kw["stop"] = list(gen.stop)
    if top_logprobs:
        kw["logprobs"] = top_logprobs
    if gen.temperature > 0:
        kw["seed"] = seed
    return kw


def llm_kwargs(recipe: Recipe, model_path: str) -> dict[str, Any]:
    v, t = recipe.collect.vllm, recipe.teacher
    kw: dict[str, Any] = {"model": model_path, "tensor_parallel_size": v.tensor_parallel_size,
                          "gpu_memory_utilization": v.gpu_memory_utilization, "dtype": v.dtype,
                          "trust_remote_code": t.trust_remote_code, "seed": recipe.seed}
    if v.max_model_len:
        kw["max_model_len"] = v.max_model_len
    if v.quantization:
        kw["quantization"] = v.quantization
    if t.revision:
        kw["revision"] = t.revision
    return kw


def _logprob_value(value: Any) -> float:
    return float(getattr(value, "logprob", value))  # vllm.sequence.Logprob, or a bare float in old versions


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


def to_result(request_output: Any, latency_s: float, k: int) -> dict:
    """A vllm RequestOutput -> our result dict."""
    out = request_output.outputs[0]
    result = {"output": out.text, "finish_reason": out.finish_reason or "stop",
              "input_tokens": len(request_output.prompt_token_ids or []), "output_tokens": len(out.token_ids),
              "latency_s": round(latency_s, 6)}
    if k:
        topk = topk_of(out.logprobs, k)
        if topk is not None:
            result["topk"] = topk
    return result


class VLLMBackend:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.llm = None

    def identity(self) -> dict:
        from toolkit.models import model_revision

        t, v = self.recipe.teacher, self.recipe.collect.vllm
        return {"backend": "vllm", "model": t.model, "revision": model_revision(t.model, t.revision),
                "dtype": v.dtype, "quantization": v.quantization}

    def load(self):
        if self.llm is not None:
            return self.llm
        try:
            import vllm
        except ImportError:
            raise MissingExtraError("collect.backend: vllm", "vllm", "gpu") from None
        from toolkit.models import resolve

        self.llm = vllm.LLM(**llm_kwargs(self.recipe, str(resolve(self.recipe.teacher.model))))
        return self.llm

    def render(self, tokenizer, messages: list[dict]) -> str:
        if self.recipe.data.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def generate(self, requests: list[Request], sink: Sink) -> None:
        if not requests:
            return
        llm = self.load()
        from vllm import SamplingParams

        cfg = self.recipe.collect
        params = SamplingParams(**sampling_kwargs(cfg.generation, cfg.top_logprobs, self.recipe.seed))
        tokenizer = llm.get_tokenizer()
        for i in range(0, len(requests), CHUNK):
            chunk = requests[i:i + CHUNK]
            started = time.perf_counter()
            outputs = llm.generate([self.render(tokenizer, r.messages) for r in chunk], params, use_tqdm=False)
            share = (time.perf_counter() - started) / len(chunk)
            for request, output in zip(chunk, outputs):  # vLLM returns outputs in input order
                sink.done(request, to_result(output, share, cfg.top_logprobs))

    def close(self) -> None:
        self.llm = None
