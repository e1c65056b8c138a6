#!/usr/bin/env bash
# docs/BENCHMARKS.md, CPU rows: a synthetic ReLU LLaMA pair of PRESET's shape (default 7b) written
# by pi-synth (ours with its planted predictors), both quantized to Q4_0 by pi-quantize, then
# pi-bench of ours against stock, CPU only, THREADS threads, prompts of 64 and 512 tokens.
#   tools/bench-cpu-q4.sh [DIR]        (DIR: where the files go, default /tmp/pi-bench-q4; ~30 GB
#                                       while the F16 pair exists, ~8 GB after)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-/tmp/pi-bench-q4}; P=${PRESET:-7b}; T=${THREADS:-2}
PY=${PY:-.venv/bin/python}
mkdir -p "$D"
if [ ! -f "$D/$P.q4.pi.gguf" ] || [ ! -f "$D/$P.q4.stock.gguf" ]; then
    # no --force: files already there stop the script (pi-synth / pi-quantize say which); the
    # F16 pair removed is the one this run just wrote
    $PY -m powerinfer_gguf synth "$D/$P.stock.gguf" --preset "$P" --pi "$D/$P.pi.gguf" \
        --calib-tokens 128 --heldout-tokens 64
    for side in pi stock; do
        $PY -m powerinfer_gguf quantize "$D/$P.$side.gguf" "$D/$P.q4.$side.gguf" --int4
        rm "$D/$P.$side.gguf"
    done
fi
$PY -m powerinfer_gguf bench "$D/$P.q4.pi.gguf" --stock "$D/$P.q4.stock.gguf" -t "$T" -p 64 -n 32 -r 3
$PY -m powerinfer_gguf bench "$D/$P.q4.pi.gguf" --stock "$D/$P.q4.stock.gguf" -t "$T" -p 512 -n 8 -r 2
