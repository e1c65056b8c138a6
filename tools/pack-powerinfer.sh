#!/usr/bin/env bash
# PowerInfer's source (a clone of SJTU-IPADS/PowerInfer, main) packed for the GPU machine as
# .gpu/powerinfer-src.tar.xz (carried, git-ignored: their code is read and run, never committed).
# Its models/ (vocabularies), docs/, media/ and smallthinker/ (a later, separate engine) stay out.
#   tools/pack-powerinfer.sh CLONE_DIR
set -euo pipefail
src=${1:?usage: $0 CLONE_DIR}
cd "$(dirname "$0")/.."
mkdir -p .gpu
git -C "$src" archive --format=tar --prefix=PowerInfer/ HEAD -- . ':!models' ':!smallthinker' ':!docs' ':!media' \
    | xz -6 > .gpu/powerinfer-src.tar.xz
echo "packed .gpu/powerinfer-src.tar.xz ($(du -h .gpu/powerinfer-src.tar.xz | cut -f1))"
