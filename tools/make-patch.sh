#!/usr/bin/env bash
# Re-write patches/NNNN-*.patch from the patched tree (vendor/llama.cpp: one commit per patch, then
# one for csrc/) after editing upstream files that patch owns, keeping its header:
#   tools/make-patch.sh 0005 src/llama-model.cpp src/models/llama.cpp
# (PATHS: the upstream files of that patch; the diff is taken against the stock commit, from the
# working tree. Our own files live in csrc/: edit them there, never through a patch.)
set -euo pipefail
cd "$(dirname "$0")/.."
num=$1; shift
patch=$(ls patches/${num}-*.patch)
tree=$(readlink -f vendor/llama.cpp)
for p in "$@"; do
  if [ -e "csrc/$p" ]; then echo "make-patch: $p is ours: edit csrc/$p instead" >&2; exit 2; fi
done
hdr=$(mktemp)
awk '/^diff --git/{exit} {print}' "$patch" > "$hdr"
{ cat "$hdr"; git -C "$tree" diff stock -- "$@"; } > "$patch.new"
mv "$patch.new" "$patch"
rm -f "$hdr"
git diff --stat -- "$patch"
