#!/usr/bin/env bash
# Build the `lema` Python wheel (maturin, release profile, abi3) from this checkout and
# install it into the project's Python environment (scripts/python-env.sh), replacing
# what an earlier build installed. The wheel lands in target/wheels/.
#
# Usage: scripts/python-package.sh     Prints the environment's python on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$(scripts/python-env.sh)"
bin="$(dirname "$py")"
rm -f target/wheels/lema-*.whl
# --locked: the wheel is built from Cargo.lock as committed, like the tests
"$bin/maturin" build --release --locked --quiet -i "$py" -o target/wheels >&2
"$py" -m pip install --quiet --force-reinstall --no-deps target/wheels/lema-*.whl >&2
echo "$py"
