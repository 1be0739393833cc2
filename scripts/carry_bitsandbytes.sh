#!/usr/bin/env bash
# bitsandbytes for the lent GPU machine, which has no PyPI (../shared/GPU.md): the Python 3.12 manylinux wheel,
# repacked with only its CUDA 13.0 and CPU libraries (~4 MB instead of 43 MB: the device call carries 64 MiB),
# into .whl/ (kept out of git), which scripts/gpu_check.sh installs when the run carries ".whl".
#   usage: scripts/carry_bitsandbytes.sh [VERSION=0.50.2] [DIR=.whl]
set -euo pipefail
cd "$(dirname "$0")/.."
V="${1:-0.50.2}"
DIR="${2:-.whl}"
PY="${PYTHON:-python3}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "bitsandbytes==$V"
"$PY" - "$tmp"/bitsandbytes-*.whl "$DIR" <<'PYEOF'
import pathlib, sys, zipfile

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")


def keep(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not (base.startswith("libbitsandbytes_") and base not in KEEP)


dst = out / src.name
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if not keep(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):  # the installer checks the files it lists
            data = b"\n".join(line for line in data.split(b"\n") if keep(line.split(b",")[0].decode()))
        zo.writestr(info, data)
print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB")
PYEOF
if [ "$DIR" = ".whl" ]; then
  ex=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$ex" 2>/dev/null || echo '/.whl/' >> "$ex"
fi
