#!/usr/bin/env bash
# Install Bonsai-LLaVA into ./.venv. `--dev` adds the test extras (torch, peft, gradio, playwright),
# the llama.cpp engine (llama-cpp-python, compiled from its sdist: a few minutes the first time, then pip's
# wheel cache; keep ~/.cache/pip between CI runs) and, on Linux, Chromium for the browser test. On Linux it also installs OpenBLAS, which MLX's
# CPU backend needs to be fast (bonsai_mlx loads it automatically).
set -euo pipefail
dev=0
[ "${1:-}" = "--dev" ] && dev=1
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  pkgs="libopenblas0-pthread"
  # Java: the METEOR reference jar; g++: llama-cpp-python compiles llama.cpp (cmake comes from PyPI if missing)
  [ "$dev" = 1 ] && pkgs="$pkgs chromium openjdk-17-jre-headless g++"
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
# llama-cpp-python compiles llama.cpp with -march=native. On CPUs with AMX (Intel Sapphire Rapids and later) that
# brings in llama.cpp's AMX kernels, which crash on the first matmul (ggml-org/llama.cpp#20824); there, build for
# the CPU's own AVX/AVX-512 features without AMX instead (docs/engines.md). CMAKE_ARGS given by you wins.
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -s)" = "Linux" ] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;; esac
  done
  export CMAKE_ARGS="$args"
  echo "AMX CPU: llama.cpp is built without AMX (CMAKE_ARGS=$CMAKE_ARGS)"
fi
if [ "$dev" = 1 ]; then
  # Pin torch first: an unpinned torch pulls a multi-GB CUDA build on Linux.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev,llama]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "installed into $(pwd)/.venv"
