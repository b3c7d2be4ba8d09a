#!/usr/bin/env bash
# lema against torch + PEFT on the CPU, in one run: the four cells of issue 12 (SmolLM2-135M
# shape, f32 weights, LoRA r16 on all seven projections, AdamW; 4 × 128 and 1 × 512, with
# and without gradient checkpointing), each side's steps timed by its own tool, and the
# machine's f32 GEMM rate three ways (lema's gemm, numpy's OpenBLAS through LEMA_BLAS,
# torch's MKL). The two sides take turns cell by cell, and ROUNDS repeats the whole set,
# so that a shared machine's slow minutes fall on both sides; the table gives each cell's
# median over the rounds, its ratio the median of the rounds' ratios. Writes
# <out>/<prefix>-lema_<cell>-r<round>.json (lema bench --json), <prefix>-torch.jsonl
# (tools/bench/cpu_torch_baseline.py, a "round" field added) and <prefix>-load.txt (the load
# average before and after each run: numbers taken while something else runs are noise).
#
# Usage: tools/bench/cpu_compare.sh [out-dir] [prefix]   (default: bench-results cpu2-issue12)
# Env: STEPS (3), ROUNDS (1), LEMA (the lema binary: target/release/lema), CELLS
# ("4x128 1x512"), TORCH (1; 0 times lema alone, e.g. an older binary, and prints no table).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/bench-results}"
prefix="${2:-cpu$(nproc)-issue12}"
steps="${STEPS:-3}"
rounds="${ROUNDS:-1}"
lema="${LEMA:-${CARGO_TARGET_DIR:-$root/target}/release/lema}"
cells="${CELLS:-4x128 1x512}"
torch_on="${TORCH:-1}"
py="$("$root/scripts/python-env.sh")"
mkdir -p "$out"
load="$out/$prefix-load.txt"
torch_out="$out/$prefix-torch.jsonl"
: >"$load"
[ "$torch_on" = 0 ] || : >"$torch_out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# numpy's OpenBLAS (in the project's venv) as the BLAS that lema bench compares with
blas="$("$py" -c 'import glob, os, numpy; d = os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs"); print((sorted(glob.glob(os.path.join(d, "libscipy_openblas*.so"))) or [""])[0])')"
stamp() { echo "$1: $(cat /proc/loadavg)" >>"$load"; }
for round in $(seq 1 "$rounds"); do
    for ck in true false; do
        for cell in $cells; do
            b="${cell%x*}"; t="${cell#*x}"
            name="lema_${cell}$([ "$ck" = false ] && echo _nockpt || true)"
            stamp "r$round $name before"
            LEMA_BLAS="$blas" "$lema" bench --shape smollm2-135m --batch "$b" --seq "$t" --steps "$steps" \
                --dtype f32 --device cpu --checkpointing "$ck" --workdir "$work" \
                --json "$out/$prefix-$name-r$round.json" >/dev/null
            stamp "r$round $name after"
            [ "$torch_on" = 0 ] && continue
            # the torch side of the same cell, right after; its GEMM rate in the first round
            gemm_flag=--no-gemm
            [ "$round$ck$cell" = "1true${cells%% *}" ] && gemm_flag=
            stamp "r$round torch_$cell $ck before"
            "$py" "$root/tools/bench/cpu_torch_baseline.py" --configs "$cell" $gemm_flag \
                --checkpointing "$([ "$ck" = true ] && echo on || echo off)" --steps "$steps" 2>/dev/null \
                | "$py" -c 'import json, sys; [print(json.dumps(dict(json.loads(l), round=int(sys.argv[1])))) for l in sys.stdin]' "$round" \
                >>"$torch_out"
            stamp "r$round torch_$cell $ck after"
        done
    done
done
[ "$torch_on" = 0 ] && exit 0
"$py" - "$out" "$prefix" "$cells" "$rounds" <<'PY'
import json, statistics, sys
out, prefix, cells, rounds = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4])
torch = [json.loads(l) for l in open(f"{out}/{prefix}-torch.jsonl")]
gemm = next(r["gflops"] for r in torch if r["impl"] == "torch-gemm")
med = statistics.median
print(f"{'cell':14} {'lema tok/s':>10} {'torch tok/s':>11} {'ratio':>6} {'of GEMM':>8}   ({rounds} round(s), medians)")
best = []
for ck in (True, False):
    for c in cells:
        b, t = map(int, c.split("x"))
        name = f"lema_{c}{'' if ck else '_nockpt'}"
        ours = [json.load(open(f"{out}/{prefix}-{name}-r{k}.json")) for k in range(1, rounds + 1)]
        theirs = [next(x for x in torch if x.get("batch") == b and x.get("seq") == t
                       and x.get("gradient_checkpointing") == ck and x.get("round") == k)
                  for k in range(1, rounds + 1)]
        ratios = [o["tokens_per_second"] / th["tokens_per_second"] for o, th in zip(ours, theirs)]
        fracs = []
        for o in ours:
            m = o["machine_gemm"]
            best.append(max(m["gflops"], gemm))
            fracs.append(o["achieved_tflops"] * 1e3 / max(m["gflops"], gemm))
        print(f"{c + (' ckpt' if ck else ' none'):14} {med(o['tokens_per_second'] for o in ours):10.1f} "
              f"{med(th['tokens_per_second'] for th in theirs):11.1f} {med(ratios):6.2f} "
              f"{100 * med(fracs):7.0f}%   ratios {' '.join(f'{r:.2f}' for r in ratios)}")
m = ours[-1]["machine_gemm"]
print(f"machine GEMM (2048³, GFLOP/s): lema {m['lema_gflops']:.1f}, BLAS {m['blas_gflops']}, torch {gemm:.1f}"
      f" (the best of lema and BLAS is measured in every lema run: {min(best):.0f}–{max(best):.0f})")
PY
