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
arch="sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
files=("$root/src/backend/cuda/common.cuh" "$root/src/backend/cuda/attention_mma.cu")
# Hopper: the wgmma kernels too, built for the arch-specific target as lema builds them
if [ "$arch" = sm_90 ]; then
    arch=sm_90a
    files+=("$root/src/backend/cuda/attention_wgmma.cu")
fi
cat "${files[@]}" |
    sed -e 's/^#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800$/#if 1/' \
        -e 's/^#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)$/#if 1/' >"$work/kernels.inc"
nvcc -O3 -std=c++17 -gencode arch=compute_${arch#sm_},code=$arch -Xptxas -v -I"$work" -o "$work/av" "$root/tools/bench/attention_variants.cu" 2>"$work/ptxas.txt" ||
    { grep -v "^ptxas info" "$work/ptxas.txt" >&2; exit 1; }
grep -i "warning" "$work/ptxas.txt" | sort | uniq -c | head -20 || true
grep -A2 -E "Compiling entry function '(v_|awg_)" "$work/ptxas.txt" | grep -E "entry|spill|Used" | sed -E "s/ptxas info *: //" || true
if [ $# -eq 0 ]; then set -- 32 8 512 2048 8192 32768; fi
"$work/av" "$@"
