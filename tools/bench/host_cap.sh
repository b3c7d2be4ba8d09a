#!/usr/bin/env bash
# `lema bench` under a host-memory cap (issue 17): each row runs in a cgroup v2 child
# group whose memory.max is the cap (swap off), after the page cache is dropped, and
# prints the step time, peak RSS (the process's VmHWM), the group's peak and OOM kills,
# the bytes read from disk per step and the tier plan lema chose.
#
#   tools/bench/host_cap.sh [LEMA] [WORKDIR] [CAPS...]
#
# LEMA: the lema binary (default: target/release/lema). WORKDIR: where the random model
# is written once, outside any cap (default: /tmp/lema-host-cap). CAPS: sizes for
# memory.max, "max" for no cap (default: max 16G 8G). Extra bench flags can be given in
# BENCH_FLAGS (default: --shape llama2-7b --batch 1 --seq 512 --device cuda); STEPS timed
# steps per row (default 5).
# Needs root and cgroup v2 mounted at /sys/fs/cgroup.
set -euo pipefail
lema=$(realpath "${1:-target/release/lema}")
work=${2:-/tmp/lema-host-cap}
shift $(( $# > 2 ? 2 : $# )) || true
caps=("$@")
[ ${#caps[@]} -gt 0 ] || caps=(max 16G 8G)
flags=${BENCH_FLAGS:---shape llama2-7b --batch 1 --seq 512 --device cuda}
steps=${STEPS:-5}
cg=/sys/fs/cgroup

[ "$(id -u)" = 0 ] || { echo "host_cap.sh: run as root (cgroups, drop_caches)" >&2; exit 1; }
[ -f $cg/cgroup.controllers ] || { echo "host_cap.sh: no cgroup v2 at $cg" >&2; exit 1; }
grep -qw memory $cg/cgroup.controllers || { echo "host_cap.sh: the memory controller is not available at $cg" >&2; exit 1; }
[ -x "$lema" ] || { echo "host_cap.sh: $lema is not executable" >&2; exit 1; }
mkdir -p "$work"
# children of the root group get the memory controller
echo +memory > $cg/cgroup.subtree_control 2>/dev/null || true

# write the model once, uncapped, so that no row is charged for writing it
echo "== writing the model in $work (once)"
# shellcheck disable=SC2086
"$lema" bench $flags --steps 1 --warmup 0 --workdir "$work" > /dev/null

for cap in "${caps[@]}"; do
  group=$cg/lema-host-cap-$cap
  mkdir -p "$group"
  echo "$cap" > "$group/memory.max"
  echo 0 > "$group/memory.swap.max" 2>/dev/null || true
  sync; echo 3 > /proc/sys/vm/drop_caches
  json=$work/cap-$cap.json
  echo "== memory.max = $cap"
  set +e
  # shellcheck disable=SC2086
  bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$group" \
    "$lema" bench $flags --steps "$steps" --workdir "$work" --json "$json" > /dev/null 2> "$work/cap-$cap.log"
  rc=$?
  set -e
  peak=$(cat "$group/memory.peak" 2>/dev/null || echo "?")
  ooms=$(awk '$1 == "oom_kill" {print $2}' "$group/memory.events" 2>/dev/null || echo "?")
  if [ $rc -ne 0 ]; then
    echo "   exit $rc (group peak $peak B, oom_kill $ooms); last lines of $work/cap-$cap.log:"
    tail -5 "$work/cap-$cap.log" | sed 's/^/   /'
  else
    python3 - "$json" "$peak" "$ooms" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
gb = lambda b: f"{b / 1e9:.2f} GB" if isinstance(b, (int, float)) else "?"
peak = int(sys.argv[2]) if sys.argv[2].isdigit() else None
print(f"   step {r['step_seconds_median']:.3f} s (all: {', '.join(f'{t:.3f}' for t in r['step_seconds_all'])})")
print(f"   peak RSS {gb(r['peak_rss_bytes'])}, group peak {gb(peak)}, oom_kill {sys.argv[3]}")
print(f"   read from disk {gb(r['disk_bytes_per_step'])}/step, copied to the GPU {gb(r['weight_bytes_per_step'])}/step")
print(f"   {r['weights_plan']}")
if r.get("stream_note"):
    print(f"   note: {r['stream_note']}")
PY
  fi
  rmdir "$group" 2>/dev/null || true
done
