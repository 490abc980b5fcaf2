"""Starting the training workers: in this process (one process), torch.distributed.run (DDP, CPU or GPU), or
`accelerate launch --config_file` when the recipe passes an accelerate config (FSDP / DeepSpeed).

Why not `accelerate launch --cpu --num_processes 2`: with --cpu accelerate takes its single-process path and
silently starts ONE process; --multi_gpu together with --cpu is refused. torch.distributed.run starts exactly
N workers with the gloo backend on CPU, and the workers report the world size they saw (train_result.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from toolkit.errors import OptkitError

if TYPE_CHECKING:
    from toolkit.config.distill import TrainSpec

log = logging.getLogger("optkit.distill")

# distributed_type values accelerate understands, and which of them need GPUs.
ACCELERATE_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_HPU",
                    "FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}
GPU_ONLY = {"MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM"}
SPEC_FILE = "train_spec.json"  # in distill/work: the TrainSpec every worker reads


def validate_accelerate_config(path: Path, num_processes: int, need_gpu_check: bool = True) -> dict:
    """Read and sanity-check an accelerate config file; its settings are passed through as they are."""
    import yaml

    field = "distill.launcher.accelerate_config"
    if not path.is_file():
        raise OptkitError(f"{field}: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())  # accelerate writes YAML or JSON; YAML reads both
    except yaml.YAMLError as exc:
        raise OptkitError(f"{field}: {path} is not valid YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OptkitError(f"{field}: {path} must be a mapping of accelerate settings")
    dtype = str(data.get("distributed_type", "NO")).upper()
    if dtype not in ACCELERATE_TYPES:
        raise OptkitError(f"{field}: {path}: unknown distributed_type '{dtype}' "
                          f"(one of {', '.join(sorted(ACCELERATE_TYPES))})")
    n = data.get("num_processes")
    if n is not None and num_processes > 1 and int(n) != num_processes:
        raise OptkitError(f"{field}: {path} says num_processes={n} but distill.launcher.num_processes="
                          f"{num_processes}; make them agree")
    if need_gpu_check and dtype in GPU_ONLY:
        import torch

        if not torch.cuda.is_available():
            raise OptkitError(f"{field}: distributed_type {dtype} needs CUDA GPUs; none here "
                              "(on CPU use launcher.num_processes with no accelerate config: DDP over gloo)")
    return data


def launch_command(spec_path: Path, num_processes: int, accelerate_config: Optional[Path]) -> list[str]:
    worker = ["-m", "toolkit.distill.train", str(spec_path)]
    if accelerate_config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                "--num_processes", str(num_processes), *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(num_processes), *worker]


def worker_env(num_processes: int) -> dict:
    env = dict(os.environ)
    # N workers share the cores: without this each would start a full-width OpenMP pool and thrash.
    threads = int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    env["OMP_NUM_THREADS"] = str(max(1, threads // num_processes))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_training(spec: "TrainSpec", num_processes: int, accelerate_config: Optional[Path],
                 on_log: Optional[Callable[[dict, int], None]] = None) -> dict:
    """Train per the spec (see train.py) with the requested launcher; returns train facts."""
    from toolkit.distill.train import train

    if num_processes == 1 and accelerate_config is None:
        return train(spec, on_log=on_log)
    if accelerate_config is not None:
        validate_accelerate_config(accelerate_config, num_processes)
    work = Path(spec.work_dir)
    spec_path = write_spec(spec, work)
    cmd = launch_command(spec_path, num_processes, accelerate_config)
    log.info("distill: launching %d training processes: %s", num_processes, " ".join(cmd))
    proc = subprocess.run(cmd, env=worker_env(num_processes))
    if proc.returncode != 0:
        reason = _failure_reason(work, proc.returncode)
        # "disk full: <path>" stays the first words of the line, as in one process
        raise OptkitError(reason if reason.startswith("disk full:") else f"distill: training workers failed: {reason}")
    facts = json.loads((work / "train_result.json").read_text())
    if on_log:  # the workers could not reach MLflow's run: replay the curves here
        for entry in facts.get("log_history", []):
            step = entry.get("step", 0)
            on_log({f"train.{k}": v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}, step)
    return facts


def write_spec(spec: "TrainSpec", work: Path) -> Path:
    """The spec as typed JSON, the one thing the workers read (train.read_spec validates it back)."""
    from toolkit.distill.checkpoints import disk_full_is_user_error
    from toolkit.io import atomic_write_text

    spec_path = work / SPEC_FILE
    with disk_full_is_user_error(spec_path):
        atomic_write_text(spec_path, spec.model_dump_json(indent=2) + "\n")
    for stale in ("train_result.json", "worker_error.txt"):
        (work / stale).unlink(missing_ok=True)
    return spec_path


def _failure_reason(work: Path, returncode: int) -> str:
    err = work / "worker_error.txt"
    if err.is_file() and err.read_text().strip():
        return err.read_text().strip().splitlines()[-1]
    # rank 0 could not even write its reason: a full disk is the likely cause, say so when it is
    from toolkit.distill.checkpoints import NEARLY_FULL

    if work.is_dir() and shutil.disk_usage(work).free < NEARLY_FULL:
        return f"disk full: {work}"
    return f"exit code {returncode} (see the log above)"
