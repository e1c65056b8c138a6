#!/usr/bin/env bash
# The sparse engine on the GPU machine's CPU (16 cores, budget 0): issue 5's host measurements.
# Two device calls, back to back (the machine stays warm ~30 s and keeps /dev/shm):
#   PRESET=3b tools/gpu-sparse-cpu.sh prep   CPU builds of both sides; synthetic F16 HF checkpoint
#                                            -> pi-convert -> our GGUF + stock twin in /dev/shm
#                                            (7b: synth ~6 min + convert ~10 min: split it)
#   PRESET=3b tools/gpu-sparse-cpu.sh run    kernel GB/s (tools/kernel-bench.sh, 13B rows), pi-bench
#                                            of the pair and the prompt crossover; results in $OUT
# Carry .gpu (the source pack: python -m powerinfer_gguf.build pack -o .gpu/llama-src.tar.xz).
set -uo pipefail
cd "$(dirname "$0")/.."
export PI_CUDA=0
source tools/gpu-env.sh
export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
M=/dev/shm/pi
mkdir -p "$M"

P=${PRESET:-7b}
case "${1:-}" in
prep)
    echo "cores: $(nproc), RAM: $(free -g | awk '/Mem/{print $2}') GiB, THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
    python3 -m powerinfer_gguf.build setup --no-python -j 16 --sides-at-once > "$OUT/build.log" 2>&1 &
    build=$!
    python3 -m powerinfer_gguf synth "$M/$P-synth.gguf" --preset "$P" --outtype f16 --hf "$M/$P-hf" 2>&1 | tail -1
    rm -f "$M/$P-synth.gguf"
    el "synth done"
    wait $build; el "builds done (rc $?)"; tail -1 "$OUT/build.log"
    python3 -m powerinfer_gguf convert "$M/$P-hf" -o "$M/$P.pi.gguf" --stock "$M/$P.stock.gguf" 2>&1 | tail -3
    el "convert done"
    rm -rf "$M/$P-hf"
    ls -la "$M"
    ;;
run)
    ls "$M/$P.pi.gguf" > /dev/null || exit 1
    python3 -m powerinfer_gguf.build setup --no-python -j 16 --sides-at-once 2>&1 | tail -1
    PY=python3 OUT_DIR=/tmp tools/kernel-bench.sh 5120 13824 8 16 5 0.05 0.1 0.2 | tee "$OUT/kernel-13b-16t.md"
    el "kernel bench done"
    python3 -m powerinfer_gguf bench "$M/$P.pi.gguf" --stock "$M/$P.stock.gguf" --vram-budget 0 -t 16 \
        -p 64 -n 64 -r 3 --json "$OUT/cpu16-$P.json" --plot "$OUT/cpu16-$P.png" 2>&1 | tail -9
    el "pi-bench done"
    python3 tools/prompt_ways.py "$M/$P.pi.gguf" "$M/$P.stock.gguf" -t 16 -r 2 -p 8,64,512 | tee "$OUT/prompt-$P.md"
    el "crossover done"
    ;;
*)
    echo "usage: [PRESET=3b] $0 prep|run" >&2
    exit 2
    ;;
esac
