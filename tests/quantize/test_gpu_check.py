"""eval/gpu_check.sh: fails loudly without CUDA, and its --cpu proof run writes the JSON a GPU run writes
(every step ok or skipped with a reason, tokens/s, peak memory, wall time). The GPU run itself needs a GPU
machine; this checks the script end to end on the real libraries with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO

SCRIPT = REPO / "eval" / "gpu_check.sh"


def _run(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def test_without_cuda_it_refuses_unless_asked_for_the_cpu_run(tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"), timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_unknown_step_is_an_error(tmp_path):
    proc = _run("--cpu", "--steps", "distill_lorra", "--out", str(tmp_path / "x.json"), timeout=300)
    assert proc.returncode == 2 and "distill_lorra" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--cpu", "--out", str(out), "--work", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu dry run" and report["environment"]["cuda_available"] is False
    steps = report["steps"]
    assert list(steps) == ["distill_lora", "distill_full", "distill_qlora", "quantize_gptq"]
    for name in ("distill_lora", "distill_full", "quantize_gptq"):
        s = steps[name]
        assert s["status"] == "ok", (name, s)
        assert s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["wall_s"] > 0 and s["peak_memory_bytes"] > 0
    assert steps["distill_lora"]["steps"] == steps["distill_full"]["steps"] == 3
    qlora = steps["distill_qlora"]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert qlora["status"] == "skipped" and "bitsandbytes" in qlora["reason"]
    else:
        assert qlora["status"] == "skipped" and "CUDA" in qlora["reason"]
    assert steps["quantize_gptq"]["bits_per_weight"] > 0
    assert not list(tmp_path.glob("gpu_check-*"))  # its scratch dir is gone
