#!/usr/bin/env bash
# One device call: CUDA set-up of both sides (timed), then pi-bench on a small synthetic model at
# budget 0 and at a budget that holds all of it, so both CPU and GPU paths of the stock side run.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/gpu-setup.sh
mkdir -p /tmp/m
python3 -m powerinfer_gguf synth /tmp/m/small.gguf --preset small --outtype q4_0 2>/dev/null | tail -3
for b in 0 100%; do
  python3 -m powerinfer_gguf bench /tmp/m/small.gguf --vram-budget "$b" -p 64 -n 64 -r 2 -t 16 \
    --json "$OUT/bench-small-$(echo $b | tr -d %).json"
done
