#!/usr/bin/env bash
# One device call: stock llama.cpp (CUDA) decode speed of a synthetic 7B-shape F16 ReLU model at
# VRAM budgets 0-100% of its weights (pi-bench's -ngl plan), the baseline the sparse engine must
# beat. The stock build and the model generation run side by side. Carry .gpu (source pack).
set -uo pipefail
cd "$(dirname "$0")/.."
export PI_CACHE=/tmp/pi-cache PI_SDIST=$PWD/.gpu/llama-src.tar.xz PI_OFFLINE=1 PI_CUDA_FA=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
GGUF_PY=$(python3 -c "from powerinfer_gguf import build; print(build.stock_llama_source() / 'gguf-py')" | tail -1) || exit 1
export PYTHONPATH=$PWD:$GGUF_PY
t0=$(date +%s)
python3 -m powerinfer_gguf.build setup --no-python --only stock -j 12 > "$OUT/build.log" 2>&1 &
build=$!
OMP_NUM_THREADS=4 python3 -m powerinfer_gguf synth /dev/shm/7b.gguf --preset 7b --outtype f16 \
    --calib-tokens 128 --heldout-tokens 64 2>/dev/null | tail -2
echo "synth done at $(( $(date +%s) - t0 )) s"
wait $build; echo "stock CUDA build done at $(( $(date +%s) - t0 )) s (rc $?)"; tail -2 "$OUT/build.log"
for b in 0 10% 20% 40% 70% 100%; do
  python3 -m powerinfer_gguf bench /dev/shm/7b.gguf --vram-budget "$b" -p 0 -n 32 -r 2 -t 16 \
     --json "$OUT/sweep-${b%\%}.json" 2>/dev/null | grep "| stock"
done
echo "total $(( $(date +%s) - t0 )) s"
