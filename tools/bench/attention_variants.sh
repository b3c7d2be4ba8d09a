#!/usr/bin/env bash
# Build tools/bench/attention_variants.cu with nvcc against the kernel file and run it:
#   tools/bench/attention_variants.sh [H KVH T...]   (default: 32 8 512 2048 8192 32768)
# Also prints ptxas's register and spill counts of every variant. Needs nvcc and a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the kernel file guards itself to sm_80+ device passes; nvcc's host pass must see the
# kernels' declarations too (this build is for one sm_80+ architecture)
cat "$root/src/backend/cuda/common.cuh" "$root/src/backend/cuda/attention_mma.cu" |
    sed 's/^#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800$/#if 1/' >"$work/kernels.inc"
arch="sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
nvcc -O3 -std=c++17 -arch="$arch" -Xptxas -v -I"$work" -o "$work/av" "$root/tools/bench/attention_variants.cu" 2>"$work/ptxas.txt"
grep -A2 "Compiling entry function 'v_" "$work/ptxas.txt" | grep -E "entry|spill|Used" | sed -E "s/ptxas info *: //" || true
if [ $# -eq 0 ]; then set -- 32 8 512 2048 8192 32768; fi
"$work/av" "$@"
