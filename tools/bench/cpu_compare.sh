#!/usr/bin/env bash
# lema against torch + PEFT on the CPU, in one run: the four cells of issue 12 (SmolLM2-135M
# shape, f32 weights, LoRA r16 on all seven projections, AdamW; 4 × 128 and 1 × 512, with
# and without gradient checkpointing), each side's steps timed by its own tool, and the
# machine's f32 GEMM rate three ways (lema's gemm, numpy's OpenBLAS through LEMA_BLAS,
# torch's MKL). Writes <out>/<prefix>-lema_<cell>.json (lema bench --json), <prefix>-torch.jsonl
# (tools/bench/cpu_torch_baseline.py) and <prefix>-load.txt (the load average before and
# after each run: numbers taken while something else runs are noise).
#
# Usage: tools/bench/cpu_compare.sh [out-dir] [prefix]   (default: bench-results cpu2-issue12)
# Env: STEPS (3), LEMA (the lema binary: target/release/lema), CELLS ("4x128 1x512"),
# TORCH (1; 0 times lema alone, e.g. an older binary, and prints no table).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/bench-results}"
prefix="${2:-cpu$(nproc)-issue12}"
steps="${STEPS:-3}"
lema="${LEMA:-${CARGO_TARGET_DIR:-$root/target}/release/lema}"
cells="${CELLS:-4x128 1x512}"
py="$("$root/scripts/python-env.sh")"
mkdir -p "$out"
load="$out/$prefix-load.txt"
: >"$load"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# numpy's OpenBLAS (in the project's venv) as the BLAS that lema bench compares with
blas="$("$py" -c 'import glob, os, numpy; d = os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs"); print((sorted(glob.glob(os.path.join(d, "libscipy_openblas*.so"))) or [""])[0])')"
for ck in true false; do
    for cell in $cells; do
        b="${cell%x*}"; t="${cell#*x}"
        name="lema_${cell}$([ "$ck" = false ] && echo _nockpt || true)"
        echo "$name before: $(cat /proc/loadavg)" >>"$load"
        LEMA_BLAS="$blas" "$lema" bench --shape smollm2-135m --batch "$b" --seq "$t" --steps "$steps" \
            --dtype f32 --device cpu --checkpointing "$ck" --workdir "$work" \
            --json "$out/$prefix-$name.json" >/dev/null
        echo "$name after: $(cat /proc/loadavg)" >>"$load"
    done
done
[ "${TORCH:-1}" = 0 ] && exit 0
echo "torch before: $(cat /proc/loadavg)" >>"$load"
"$py" "$root/tools/bench/cpu_torch_baseline.py" --configs "$(echo $cells | tr ' ' ,)" \
    --checkpointing both --steps "$steps" 2>/dev/null >"$out/$prefix-torch.jsonl"
echo "torch after: $(cat /proc/loadavg)" >>"$load"
"$py" - "$out" "$prefix" "$cells" <<'PY'
import json, sys
out, prefix, cells = sys.argv[1], sys.argv[2], sys.argv[3].split()
torch = [json.loads(l) for l in open(f"{out}/{prefix}-torch.jsonl")]
gemm = next(r["gflops"] for r in torch if r["impl"] == "torch-gemm")
print(f"{'cell':14} {'lema tok/s':>10} {'torch tok/s':>11} {'ratio':>6} {'of GEMM':>8}")
for ck in (True, False):
    for c in cells:
        b, t = map(int, c.split("x"))
        r = json.load(open(f"{out}/{prefix}-lema_{c}{'' if ck else '_nockpt'}.json"))
        tr = next(x for x in torch if x.get("batch") == b and x.get("seq") == t
                  and x.get("gradient_checkpointing") == ck)
        m = r["machine_gemm"]
        best = max(m["gflops"], gemm)
        frac = r["achieved_tflops"] * 1e3 / best
        print(f"{c + (' ckpt' if ck else ' none'):14} {r['tokens_per_second']:10.1f} "
              f"{tr['tokens_per_second']:11.1f} {r['tokens_per_second'] / tr['tokens_per_second']:6.2f} "
              f"{100 * frac:7.0f}%")
print(f"machine GEMM (2048³, GFLOP/s): lema {m['lema_gflops']:.1f}, BLAS {m['blas_gflops']}, torch {gemm:.1f}")
PY
