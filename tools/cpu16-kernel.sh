#!/usr/bin/env bash
# The CPU kernel on the GPU machine's host CPU (16 cores): GB/s of rows it reads against ggml's
# dense mat-vec, in interleaved rounds (single figures there move by 5-10%), and decode end to end.
#   tools/cpu16-kernel.sh kernel [ROUNDS]
#       CPU build of the patched side, then the rounds; writes $OUT/kernel-options.txt (one line per
#       run, "cfg=<fire>/<threads> round=N | ...") and its summary
#       (tools/kernel_summary.py) $OUT/kernel-summary.md
#   tools/cpu16-kernel.sh all [ROUNDS]
#       both of the steps below in one call: builds both sides, the rounds, then e2e
#   tools/cpu16-kernel.sh e2e
#       decode end to end at budget 0: both sides built for the CPU, the synthetic 7B-shape F16 pair
#       (in /dev/shm), then pi-bench (stock against ours, 16 threads)
# Carry .gpu (the source pack: python -m powerinfer_gguf.build pack -o .gpu/llama-src.tar.xz).
set -uo pipefail
cd "$(dirname "$0")/.."
export PI_CUDA=0
source tools/gpu-env.sh
lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(|L3" | tee "$OUT/lscpu.txt"

M=/dev/shm/pi
mkdir -p $M
build() {  # both sides (e2e) or the patched one (kernel), once per machine
    { [ -f $M/built-$1 ] || [ -f $M/built-both ]; } && return
    if [ $1 = both ]; then
        python3 -m powerinfer_gguf.build setup --no-python -j 16 --sides-at-once > "$OUT/build.log" 2>&1
    else
        python3 -m powerinfer_gguf.build setup --no-python --only patched -j 16 > "$OUT/build.log" 2>&1
    fi
    el "CPU build ($1) done (rc $?)"; tail -2 "$OUT/build.log"; touch $M/built-$1
}

kernel() {
    build patched
    # share of computed neurons that fire / threads
    kernel_rounds "$1" 1/16 0.66/16 | tee "$OUT/kernel-options.txt" | tail -3
    python3 tools/kernel_summary.py "$OUT/kernel-options.txt" | tee "$OUT/kernel-summary.md"
    el "kernel rounds done"
}

e2e() {
    build both
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    if [ ! -f $M/7b.pi.gguf ]; then
        OMP_NUM_THREADS=16 python3 -m powerinfer_gguf synth $M/7b.stock.gguf --preset 7b --outtype f16 \
            --pi $M/7b.pi.gguf --calib-tokens 128 --heldout-tokens 64 > "$OUT/synth.log" 2>&1
        el "7B pair written (rc $?)"; tail -2 "$OUT/synth.log" | tr '\r' '\n' | tail -2
    fi
    python3 -m powerinfer_gguf bench $M/7b.pi.gguf --stock $M/7b.stock.gguf --vram-budget 0 \
        -t 16 -p 64 -n 32 -r 2 --json "$OUT/e2e.json" 2>&1 | grep -v "^\[" | tee "$OUT/e2e.txt"
    el "pi-bench done"
}

case "${1:-}" in
kernel) kernel "${2:-3}" ;;
e2e) e2e ;;
all) build both; kernel "${2:-3}"; e2e ;;
*) echo "usage: $0 kernel [ROUNDS] | e2e | all [ROUNDS]" >&2; exit 2 ;;
esac
