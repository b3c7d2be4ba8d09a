#!/usr/bin/env bash
# The disk's read rate for the staging ring (issue 17): sequential reads of FILE with
# O_DIRECT, one stream and four in flight (as the ring's readers do), and buffered, each
# after dropping the page cache. Root is needed to drop the cache.
#
#   tools/bench/disk_read.sh FILE            # e.g. the bench's model.safetensors
#
# Prints GB/s per mode and the issue's step target for a 13.5 GB model:
# 1.2 × 2 × 13.5 GB ÷ the best rate. NO_DROP=1 keeps the page cache (the buffered rate is
# then the cache's, not the disk's).
set -euo pipefail
file=${1:?usage: disk_read.sh FILE}
[ -r "$file" ] || { echo "disk_read.sh: cannot read $file" >&2; exit 1; }
[ -n "${NO_DROP:-}" ] || [ "$(id -u)" = 0 ] || { echo "disk_read.sh: run as root (it drops the page cache), or set NO_DROP=1" >&2; exit 1; }
bytes=$(stat -c %s "$file")
chunk=$((8 << 20))
chunks=$(( (bytes + chunk - 1) / chunk ))

drop() { [ -n "${NO_DROP:-}" ] || { sync; echo 3 > /proc/sys/vm/drop_caches; }; }
rate() { python3 -c "import sys; print(f'{$1 / $2 / 1e9:.2f}')"; }

# $1: parallel streams, $2: dd iflag (direct or empty)
measure() {
  local n=$1 flag=$2 per=$(( (chunks + $1 - 1) / $1 )) start end pids=()
  drop
  start=$(date +%s.%N)
  for ((i = 0; i < n; i++)); do
    dd if="$file" of=/dev/null bs=$chunk skip=$((i * per)) count=$per ${flag:+iflag=$flag} status=none &
    pids+=($!)
  done
  wait "${pids[@]}"
  end=$(date +%s.%N)
  rate "$bytes" "$(python3 -c "print($end - $start)")"
}

echo "file: $file ($(rate "$bytes" 1) GB)"
d1=$(measure 1 direct);   echo "O_DIRECT, 1 stream:    $d1 GB/s"
d4=$(measure 4 direct);   echo "O_DIRECT, 4 in flight: $d4 GB/s"
b1=$(measure 1 "");       echo "buffered, 1 stream:    $b1 GB/s"
if [ -n "${NO_DROP:-}" ]; then best=$(python3 -c "print(max($d1, $d4))"); else best=$(python3 -c "print(max($d1, $d4, $b1))"); fi
python3 -c "print(f'step target for 13.5 GB (1.2 × 2 × 13.5 GB ÷ {$best} GB/s): {1.2 * 2 * 13.5 / $best:.2f} s')"
