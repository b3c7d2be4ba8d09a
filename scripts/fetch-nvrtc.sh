#!/usr/bin/env bash
# Fetch NVRTC (CUDA 13.0's run-time compiler, a PyPI wheel) into .cache/nvrtc, so that the
# CUDA kernels can be compiled, and so checked, on machines without a GPU or a toolkit.
# Prints the folder holding libnvrtc.so.13. Needs python3 with pip and the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/nvrtc
if ! ls "$dest"/nvidia/cu13/lib/libnvrtc.so.13 >/dev/null 2>&1; then
  mkdir -p "$dest"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dest" "nvidia-cuda-nvrtc==13.0.*" >&2
  python3 - "$dest" <<'PY'
import pathlib, sys, zipfile
dest = pathlib.Path(sys.argv[1])
for whl in dest.glob("nvidia_cuda_nvrtc-*.whl"):
    with zipfile.ZipFile(whl) as z:
        z.extractall(dest, [n for n in z.namelist() if "/lib/" in n])
    whl.unlink()
PY
fi
echo "$PWD/$dest/nvidia/cu13/lib"
