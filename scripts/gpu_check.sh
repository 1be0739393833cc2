#!/usr/bin/env bash
# The GPU check for a lent H100/H200 (../shared/GPU.md): tests/train_cuda on CUDA, then train_cuda.bench, one
# Markdown + JSON report under $OUT, in about 8 minutes. Wheels carried in .whl/ are installed first: make the
# bitsandbytes one (NF4 student and teacher) with scripts/carry_bitsandbytes.sh. Without it the NF4 parts fail
# and are reported as failed. Dry run on a CPU: GPU_CHECK_SMOKE=1 scripts/gpu_check.sh (or --smoke).
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 600
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "gpu_check: carried wheels did not install"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
exec "$PY" -m train_cuda.gpu_check --out "$OUT" "$@"
