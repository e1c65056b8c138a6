#!/usr/bin/env bash
# Issue 19 on the GPU machine: PowerInfer itself (SJTU-IPADS/PowerInfer, main) on the weights of our
# synthetic pair, at the budget stock and ours run at. Its source travels as .gpu/powerinfer-src.tar.xz
# (tools/pack-powerinfer.sh makes it here from a clone; nothing of it is committed). Calls back to back:
#   tools/gpu-peer.sh build      PowerInfer's main with CUDA (its CMake, LLAMA_CUBLAS)
#   [PRESET=13b] [BUDGET=10] tools/gpu-peer.sh run
#                                after `tools/gpu-split.sh synth`: our file in PowerInfer's format
#                                (tools/powerinfer_peer.py: predictors mapped, agreement printed), its
#                                GPU index from its own solver where cvxopt is there, else the same
#                                objective by our tool at the capacity it logs; then tools/peer_bench.py:
#                                stock's faster way, PowerInfer and ours at BUDGET GiB, decode 128 tokens
#                                after prompts of 1 and 64, pp512
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu-env.sh
P=${PRESET:-13b}
B=${BUDGET:-10}
M=$(cat /tmp/pi-models-dir 2>/dev/null || echo /dev/shm/pi)
PI=/tmp/PowerInfer

case "${1:-}" in
build)
    rm -rf $PI && tar -xJf .gpu/powerinfer-src.tar.xz -C /tmp
    cmake -S $PI -B $PI/build -DLLAMA_CUBLAS=ON -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/peer-build.log" 2>&1 &&
        cmake --build $PI/build -j 16 --target main >> "$OUT/peer-build.log" 2>&1
    el "PowerInfer build rc $?"; tail -3 "$OUT/peer-build.log"
    ;;
run)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    W=$M/$P.powerinfer.gguf
    rm -f $W $W.generated.gpuidx
    python3 tools/powerinfer_peer.py model $M/$P.pi.gguf $W --tokens 256 2>&1 | grep -v "^llama\|^print_info\|^load" \
        | tee "$OUT/$P-peer-agreement.txt"
    el "converted"
    # its solver reads activation_N.pt (torch) from <model dir>/activation: our frequencies
    mkdir -p $M/activation && python3 - "$M/$P.pi.gguf" "$M/activation" <<'EOF'
import sys, gguf, numpy as np, torch
r = gguf.GGUFReader(sys.argv[1])
for t in r.tensors:
    if t.name.endswith("pi_neuron_freq"):
        torch.save(torch.tensor(np.asarray(t.data, np.float32) * 1e6), f"{sys.argv[2]}/activation_{t.name.split('.')[1]}.pt")
EOF
    run_main() {  # PowerInfer's main: prompt of $1 tokens (a repeated word), $2 generated
        PYTHONPATH=$PI/powerinfer-py:$PYTHONPATH $PI/build/bin/main -m $W -t 16 --vram-budget $B -n $2 --log-disable \
            -p "$(python3 -c "print(' '.join(['the'] * max(1, $1 - 1)))")" --ignore-eos --temp 0 2>&1
    }
    run_main 1 8 > /tmp/peer-first.log
    if ! [ -f $W.generated.gpuidx ]; then  # its solver did not run here: the same objective by ours
        MIB=$(grep -o "gpu split for [0-9.]* MiB" /tmp/peer-first.log | grep -o "[0-9.]*" | head -1)
        D=$(python3 -c "from powerinfer_gguf.synth import PRESETS; print(PRESETS['$P'][0])")
        # its capacity rule (llm_load_gpu_split_with_budget): neurons = floor(bytes / (row bytes * 4.5)) * 4
        CAP=$(python3 -c "print(int(${MIB:-0} * 2**20 // ($D * 2 * 4.5)) * 4)")
        python3 tools/powerinfer_peer.py gpuidx $M/$P.pi.gguf $W.generated.gpuidx --neurons $CAP \
            --vram-capacity $(python3 -c "print(int(${MIB:-0} * 2**20))") | tee -a "$OUT/$P-peer-agreement.txt"
        grep -i "error\|solver\|split" /tmp/peer-first.log | head -5 | tee -a "$OUT/$P-peer-agreement.txt"
    fi
    # the three engines, interleaved, each by its own counters (tools/peer_bench.py)
    python3 tools/peer_bench.py $M/$P.pi.gguf $M/$P.stock.gguf $W --powerinfer $PI/build/bin/main --budget-gib $B \
        -t 16 -n 128 -r 2 --json "$OUT/$P-peer.json" 2>&1 | tee "$OUT/$P-peer.txt" | grep -v "^round"
    el "three engines done"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
