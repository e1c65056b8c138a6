#!/usr/bin/env bash
# One device call: train the real-text ReLU LLaMA on the GPU (background) while the patched side
# builds with CUDA; then run a converted model greedy on CPU (-ngl 0) and GPU (-ngl 99): the
# tokens must agree (patches 0002/0003 on CUDA: ReGLU, out_prod over the row-per-neuron down).
# Carry .gpu (source pack, training data, .gpu/small.pi.gguf made by pi-convert).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
( python3 tools/train_relu_llama.py train .gpu/train "$OUT/ckpt" --steps "${STEPS:-3000}" > "$OUT/train.log" 2>&1 ) &
train=$!
export PI_CACHE=/tmp/pi-cache PI_SDIST=$PWD/.gpu/llama-src.tar.xz PI_OFFLINE=1 PI_CUDA_FA=0 PYTHONPATH=$PWD
t0=$(date +%s)
python3 -m powerinfer_gguf.build setup --no-python --only patched -j 15 || exit 1
echo "patched CUDA build: $(( $(date +%s) - t0 )) s"
BIN=$(python3 -c "from powerinfer_gguf.build import build_dir; print(build_dir('patched'))")/bin
for ngl in 0 99; do
  "$BIN/llama-completion" -m .gpu/small.pi.gguf -p "The meaning of the word" -n 32 --temp 0 -ngl $ngl \
     -no-cnv --no-display-prompt -t 8 2>"$OUT/completion-ngl$ngl.err" > "$OUT/completion-ngl$ngl.txt"
  echo "ngl $ngl: rc=$? $(wc -c < "$OUT/completion-ngl$ngl.txt") bytes"; grep -i "error\|offloaded" "$OUT/completion-ngl$ngl.err" | head -3
done
cmp "$OUT/completion-ngl0.txt" "$OUT/completion-ngl99.txt" && echo "CPU and GPU generate the same tokens"
wait $train; echo "training rc=$?"; tail -4 "$OUT/train.log"; ls -la "$OUT/ckpt"
