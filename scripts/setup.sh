#!/usr/bin/env bash
# Install Bonsai-LLaVA into ./.venv. `--dev` adds the test extras (torch, peft, gradio, playwright)
# and, on Linux, Chromium for the browser test. On Linux it also installs OpenBLAS, which MLX's
# CPU backend needs to be fast (bonsai_mlx loads it automatically).
set -euo pipefail
dev=0
[ "${1:-}" = "--dev" ] && dev=1
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  pkgs="libopenblas0-pthread"
  [ "$dev" = 1 ] && pkgs="$pkgs chromium openjdk-17-jre-headless"  # Java: the METEOR reference jar
  missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" != "0" ] && sudo="sudo"
    echo "installing system packages:$missing"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  # Pin torch first: an unpinned torch pulls a multi-GB CUDA build on Linux.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "installed into $(pwd)/.venv"
