#!/usr/bin/env bash
# Convert the cached SmolLM2-135M-Instruct GGUF (see fetch-smollm2.sh) into
# .cache/models/smollm2-135m/: model.safetensors (bf16, HF names), config.json and the
# tokenizer files. Converts every time (about 2 s), so that the folder always holds what
# this build's `prepare` writes, never an older conversion.
#
# Usage: scripts/prepare-smollm2.sh [f32|f16|bf16]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$root/.cache/models/smollm2-135m"

if [ ! -s "$src" ]; then
    "$root/scripts/fetch-smollm2.sh"
fi
cd "$root"
cargo build --release --example prepare
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/prepare"
"$bin" "$src" "$out" "$@"
