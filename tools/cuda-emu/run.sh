#!/usr/bin/env bash
# Run the tensor-core attention kernels on the CPU (see attention_mma_emu.cpp): checks
# fragment layouts, masks, pipelining and GQA/packing logic without a GPU. Needs g++ with
# C++20. Arguments go to the emulator ([seed] [case index]).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$here/../../src/backend/cuda/attention_mma.cu" "$work/kern.inc" <<'PY'
import sys
s = open(sys.argv[1]).read()
a = s.index("// ---- PTX primitives")
b = s.index("// ---- end of PTX primitives ----")
open(sys.argv[2], "w").write(s[:a] + s[b:])
PY
g++ -std=c++20 -O2 -pthread -w -I"$work" -o "$work/emu" "$here/attention_mma_emu.cpp"
"$work/emu" "$@"
