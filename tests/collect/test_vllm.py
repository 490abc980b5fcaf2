"""The vllm backend. Its real path needs a GPU and the `gpu` extra, which this machine lacks, so it cannot run
here: what is tested is (1) the error when vllm is missing, (2) the pure parts (SamplingParams / LLM
arguments, RequestOutput -> record), and (3) the backend's control flow (chunking, chat rendering with the
real SmolLM2 tokenizer, persisting per chunk) against a stand-in `vllm` module. The stand-in's output
objects mirror vLLM's RequestOutput / CompletionOutput / Logprob fields; it is a test double for the GPU
engine only."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tests.collect.conftest import read_jsonl, write_recipe
from toolkit.cli import main
from toolkit.collect.backends import vllm as vb
from toolkit.config import GenerationConfig, recipe_from_dict


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Optional[list]
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (the fields we read)
    request_id: str
    prompt: str
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = True


def test_missing_vllm_names_the_extra(workdir, capsys):
    if "vllm" in sys.modules or _importable("vllm"):
        pytest.skip("vllm is installed here")
    assert main(["run", str(write_recipe(workdir, {"backend": "vllm"}, data={"limit": 3}))]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the package 'vllm'" in err and "optkit[gpu]" in err and "\n" not in err


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_sampling_kwargs():
    greedy = vb.sampling_kwargs(GenerationConfig(max_new_tokens=12), top_logprobs=0, seed=7)
    assert greedy == {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 1}
    sampled = vb.sampling_kwargs(GenerationConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, stop=["\n"]),
                                 top_logprobs=4, seed=7)
    assert sampled == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "n": 1, "stop": ["\n"], "logprobs": 4,
                       "seed": 7}


def test_llm_kwargs_follow_the_recipe():
    r = recipe_from_dict({"name": "t", "teacher": {"model": "org/teacher", "revision": "abc", "trust_remote_code": True},
                          "data": {"path": "x.jsonl"}, "seed": 3,
                          "collect": {"backend": "vllm", "vllm": {"tensor_parallel_size": 4, "max_model_len": 4096,
                                                                  "quantization": "awq", "dtype": "bfloat16"}}})
    assert vb.llm_kwargs(r, "/models/teacher") == {
        "model": "/models/teacher", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.9, "dtype": "bfloat16",
        "trust_remote_code": True, "seed": 3, "max_model_len": 4096, "quantization": "awq", "revision": "abc"}


def test_request_output_to_result_keeps_top_k():
    # vLLM returns the top-k plus the sampled token when it is not among them: k=2 here, 3 entries at step 1.
    positions = [{5: Logprob(-0.1, 1), 9: Logprob(-2.5, 2)},
                 {7: Logprob(-0.3, 1), 3: Logprob(-1.0, 2), 11: Logprob(-4.0, 9)}]
    ro = RequestOutput("0", "p", [1, 2, 3, 4], [CompletionOutput(0, "hi", [5, 11], -4.1, positions, "length")])
    result = vb.to_result(ro, 0.25, k=2)
    assert result == {"output": "hi", "finish_reason": "length", "input_tokens": 4, "output_tokens": 2,
                      "latency_s": 0.25, "topk": {"ids": [[5, 9], [7, 3]], "logprobs": [[-0.1, -2.5], [-0.3, -1.0]]}}
    assert "topk" not in vb.to_result(ro, 0.25, k=0)


class FakeLLM:
    """Stand-in for vllm.LLM (GPU engine): answers from the prompt text, remembers its calls."""

    instances: list = []

    def __init__(self, **kwargs):
        from toolkit.models import load_tokenizer

        self.kwargs = kwargs
        self.calls: list = []
        self.tokenizer = load_tokenizer("smollm2-135m-instruct")
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((list(prompts), params))
        outs = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            text = "answer:" + p.rsplit("Customer says: ", 1)[-1].split("<|im_end|>")[0][:10]
            outs.append(RequestOutput(str(i), p, ids, [CompletionOutput(0, text, [1, 2, 3], None, None, "stop")]))
        return outs


def test_backend_chunks_renders_and_persists(workdir, monkeypatch, smollm2_dir):
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vb, "CHUNK", 4)
    FakeLLM.instances.clear()
    collect = {"backend": "vllm", "generation": {"max_new_tokens": 9}, "vllm": {"tensor_parallel_size": 2}}
    path = write_recipe(workdir, collect, data={"limit": 10, "prompt_template": "Customer says: {instruction}"})
    assert main(["run", str(path)]) == 0
    llm = FakeLLM.instances[0]
    assert llm.kwargs["tensor_parallel_size"] == 2 and (Path(llm.kwargs["model"]) / "config.json").is_file()
    assert [len(c[0]) for c in llm.calls] == [4, 4, 2]  # chunks of CHUNK prompts
    assert all(c[1] == {"max_tokens": 9, "temperature": 0.0, "top_p": 1.0, "n": 1} for c in llm.calls)
    assert all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for c in llm.calls for p in c[0])
    records = read_jsonl(workdir / "artifacts" / "t" / "collect" / "outputs.jsonl")
    assert len(records) == 10
    for r in records:
        assert r["output"] == "answer:" + r["prompt"][:10] and r["output_tokens"] == 3 and r["input_tokens"] > 10
    store = workdir / "artifacts" / "t" / "collect" / "work" / "results.jsonl"
    assert len(store.read_text().splitlines()) == 10
