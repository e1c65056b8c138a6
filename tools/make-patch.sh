#!/usr/bin/env bash
# Re-write patches/NNNN-*.patch from the patched tree (vendor/llama.cpp, one commit per patch) after
# editing files that patch owns, keeping its header:   tools/make-patch.sh 0004 ggml
# (PATHS: the folders/files of that patch; the diff is taken against the commit before it, from the
# working tree: name only files no later patch touches, or the later patch's changes land here too.)
set -euo pipefail
cd "$(dirname "$0")/.."
num=$1; shift
patch=$(ls patches/${num}-*.patch)
tree=$(readlink -f vendor/llama.cpp)
base=$(git -C "$tree" log --format=%H --grep="^${num}-" -n1)^
hdr=$(mktemp)
awk '/^diff --git/{exit} {print}' "$patch" > "$hdr"
{ cat "$hdr"; git -C "$tree" diff "$base" -- "$@"; } > "$patch.new"
mv "$patch.new" "$patch"
rm -f "$hdr"
git diff --stat -- "$patch"
