#!/usr/bin/env bash
# Build (once) the project's Python environment: a venv under .cache/python/venv-<hash>
# holding the pins of tools/python/requirements.txt (torch, transformers, peft, safetensors,
# numpy), where <hash> is the hash of that file, so a changed pin builds a fresh venv.
# Idempotent: a finished venv is reused (a marker file is written last, so an interrupted
# install is redone); concurrent callers wait on a lock. Needs python3 (>= 3.10) with venv,
# and the package index the first time (torch pulls several GB of CUDA wheels).
#
# Usage: scripts/python-env.sh     Prints the venv's python on its last line (stdout);
#                                  progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/tools/python/requirements.txt"
hash="$(sha256sum "$req" | cut -c1-12)"
mkdir -p "$root/.cache/python"
# The real path: a venv's scripts name their interpreter by absolute path, so it must not
# depend on a symlink or worktree that names .cache.
base="$(cd "$root/.cache/python" && pwd -P)"
venv="$base/venv-$hash"
py="$venv/bin/python"
exec 9>"$base/.lock-$hash"
flock 9
if [ ! -f "$venv/.complete" ]; then
    start=$(date +%s)
    echo "python-env: building $venv from tools/python/requirements.txt (torch brings several GB of CUDA wheels; minutes)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$py" -m pip install --quiet -r "$req" >&2
    "$py" -c "import torch, transformers, peft, safetensors, numpy" >&2
    cp "$req" "$venv/requirements.txt"
    touch "$venv/.complete"
    echo "python-env: built in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)" >&2
fi
echo "$py"
