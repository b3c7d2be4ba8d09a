#!/usr/bin/env bash
# Build (once) the environment of the reference scripts in tools/reference/: a venv under
# .cache/reference-venv-<hash> that sees the project's Python environment (scripts/python-env.sh:
# torch, transformers, accelerate, numpy, ... at the pins of tools/python/requirements.txt,
# built first if needed) and adds the pins of tools/reference/requirements.txt (llama.cpp's
# gguf-py, which transformers' GGUF loader needs for gemma3 and llama files). <hash> covers both
# requirement files, so a changed pin builds a fresh venv. Layering instead of a second copy
# saves the ~5.6 GB of torch and its CUDA wheels (PyPI has no CPU-only torch for Linux); the
# link is one .pth file (`site.addsitedir` of the project venv's site-packages, after the
# reference venv's own). Idempotent: a finished venv is reused (a marker file is written last);
# concurrent callers wait on a lock. Needs the package index the first time.
#
# Usage: tools/reference/env.sh     Prints the venv's python on its last line (stdout);
#                                   progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
req="$root/tools/reference/requirements.txt"
base_py="$("$root/scripts/python-env.sh")"
hash="$(cat "$root/tools/python/requirements.txt" "$req" | sha256sum | cut -c1-12)"
mkdir -p "$root/.cache"
# the real path, as in scripts/python-env.sh: a venv names its interpreter by absolute path
base="$(cd "$root/.cache" && pwd -P)"
venv="$base/reference-venv-$hash"
py="$venv/bin/python"
exec 9>"$base/.reference-venv-$hash.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    echo "reference-env: building $venv on top of $(dirname "$(dirname "$base_py")")" >&2
    rm -rf "$venv"
    # without its own pip and setuptools: those of the project venv are used (an own, older
    # setuptools would shadow the one torch requires)
    "$base_py" -m venv --without-pip "$venv"
    purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
    under="$("$base_py" -c "$purelib")"
    own="$("$py" -c "$purelib")"
    echo "import site; site.addsitedir('$under')" >"$own/zz_lema_project_venv.pth"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req" >&2
    "$py" -m pip check >&2
    "$py" -c "import torch, transformers, accelerate, gguf" >&2
    cp "$req" "$venv/requirements.txt"
    touch "$venv/.complete"
fi
echo "$py"
