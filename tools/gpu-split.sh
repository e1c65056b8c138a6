#!/usr/bin/env bash
# Issue 6 on the GPU machine: hot FFN rows on the GPU under a VRAM budget, against stock at the same
# budget. Calls back to back (the machine stays warm ~30 s; /dev/shm and the builds survive); each
# step runs in the foreground with nothing else on the machine (a synthesis beside a measurement
# would share the CPU's memory bandwidth with both sides' cold rows):
#   tools/gpu-split.sh prep    builds both sides with CUDA (= build); on a small model, sparse == dense
#                              with every neuron active at budgets 0/55/100% (= splitcheck), decode,
#                              small ubatches and a 40-token prompt (the ways agreeing); then optests
#   tools/gpu-split.sh optests the ops and the dense way's out_prod on CUDA against their
#                              definitions and the CPU; the gather's and the dense chunk's times
#   [PRESET=13b] [BUDGET=10GiB] tools/gpu-split.sh buffers
#                              the planner's compute reserve against the buffers llama.cpp allocates
#   [PRESET=13b] [BUDGET=10GiB] tools/gpu-split.sh nodes
#                              time per graph node of one 512-token ubatch (tools/node_profile.py)
#   PRESET=13b tools/gpu-split.sh synth
#                              writes that pair (other presets' files removed first; 13B ~440 s)
#   [PRESET=13b] [BUDGET=10GiB] [BUDGETS="10GiB 0"] [TTFT=1] tools/gpu-split.sh prompt
#                              pi-bench at each of BUDGETS (default BUDGET and 0): pp512 + tg32,
#                              then (TTFT=1) time to first token of 512/2048 at BUDGET
#   [PRESET=13b] [BUDGET=50%] tools/gpu-split.sh q4
#                              the pair to Q4_0 (pi-quantize; kept if synthq wrote it), pi-bench at
#                              BUDGET: tg128, pp64, pp512
#   [PRESET=13b] [BUDGET=10GiB] tools/gpu-split.sh serve
#                              pi-bench --serve 1,4,8: streams served at once, ours (pi-serve
#                              --parallel's llama-server) against stock llama-server, same budget
#   PRESET=70b tools/gpu-split.sh synthq
#                              a Q4_0 pair written directly, layer by layer (40b/70b: no F16 file fits)
#   tools/gpu-split.sh kernel  CPU kernel GB/s of rows read against dense, 16 threads, 2 MB pages,
#                              interleaved rounds; the op on CUDA against its definition and the CPU
#   [PRESET=13b] [BUDGET=10GiB] tools/gpu-split.sh variants
#                              -ot and ours' pp512 as pi-bench runs them, with --poll 0, -t 4, -lm auto;
#                              ours' one ubatch through the Python API, fixed and random tokens
#                              (tools/bench_variants.py), rounds interleaved
#   [PRESET=7b] [BUDGET=10GiB] tools/gpu-split.sh head
#                              waits for that synth; pi-bench at BUDGET (default 40%; stock's best of
#                              -ngl and -ot vs ours)
#   [PRESET=7b] [BUDGET=10GiB] tools/gpu-split.sh profile
#                              all-GPU against all layers split; thread-pool poll / cpu-strict A/B;
#                              pi-bench --profile at 0 and BUDGET (CPU kernel ms, GB/s, threads)
#   tools/gpu-split.sh sweep   13B budget sweep 0-100%, stock and ours (JSON; table/plot made here)
#   [PRESET=13b] tools/gpu-split.sh rpc
#                              after synthq: ours against stock over RPC, two local rpc-servers of
#                              each build (CUDA0 and CPU), tools/rpc_bench.py
#   tools/gpu-split.sh recheck on a fresh machine: patched build, small model, split-layer check, the
#                              op's tests on CUDA (test-pi-sparse-ffn, test-backend-ops)
# Carry .gpu (the source pack: python -m powerinfer_gguf.build pack -o .gpu/llama-src.tar.xz).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu-env.sh
P=${PRESET:-13b}
# /dev/shm when it holds a pair (2 x 26 GB at 13B), else the disk; chosen once, when the first
# synthesis starts (a later call sees /dev/shm filling and must not choose again)
if [ -f /tmp/pi-models-dir ]; then
    M=$(cat /tmp/pi-models-dir)
else
    M=/dev/shm/pi
    [ "$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)" -ge 60 ] || M=/tmp/pi
fi
mkdir -p $M
start_synth() {  # a preset's pair at an outtype (f16: $P.{stock,pi}.gguf, q4_0: $P.q4.*), in the
    # foreground; earlier pairs are removed (the memory holds one 13B F16 or 70B Q4_0 pair, not two)
    local p=$1 t=$2 tag=$1
    [ "$t" = f16 ] || tag=$1.q4
    echo $M > /tmp/pi-models-dir
    rm -f $M/*.gguf
    OMP_NUM_THREADS=16 python3 -m powerinfer_gguf synth $M/$tag.stock.gguf --preset $p --outtype $t \
        --pi $M/$tag.pi.gguf --calib-tokens 128 --heldout-tokens 64 > $M/$tag.synth.log 2>&1
    echo $? > $M/$tag.synth.rc
    el "synthesis of $tag: rc $(cat $M/$tag.synth.rc)"; tail -1 $M/$tag.synth.log
}

build_both() {  # both sides alone, all cores (next to a synthesis they ran past a call's 10 minutes)
    python3 -m powerinfer_gguf.build setup --no-python -j 16 --sides-at-once > "$OUT/build.log" 2>&1
    el "builds done (rc $?)"; tail -2 "$OUT/build.log"
}
split_check() {  # a small model: sparse == dense at budgets 0/55/100%, the ways agreeing
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    python3 -m powerinfer_gguf synth /tmp/chk.stock.gguf --preset 1b --layers 4 --outtype f16 --pi /tmp/chk.pi.gguf --force \
        --calib-tokens 256 --heldout-tokens 128 2>&1 | tail -1
    el "check model done"
    timeout 200 python3 tools/gpu_split_check.py /tmp/chk.pi.gguf 0 55% 100% 2>&1 \
        | grep -E "budget|Error|error|Traceback" | tee "$OUT/split-check.txt"
    el "check done"
}
op_tests() {  # the ops on CUDA against their definitions and the CPU (quantized rows included), and
    # the out_prod of the dense GPU way
    $(pi_patched_bin)/test-pi-sparse-ffn 2>&1 | tail -2 | tee "$OUT/pi-sparse-ffn.txt"
    for op in PI_GATHER_ROWS PI_SPARSE_FFN OUT_PROD; do
        $(pi_patched_bin)/test-backend-ops -o $op -b CUDA0 2>&1 | grep -E "FAIL|passed" | tail -3
    done | tee "$OUT/backend-ops.txt"
    el "op tests done"
}

case "${1:-}" in
build)
    build_both
    ;;
optests)
    op_tests
    # the gather against copying the whole weight; the dense way's chunk, its down as out_prod
    $(pi_patched_bin)/test-pi-sparse-ffn --perf | tee "$OUT/gather-perf.txt"
    ;;
prep)
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
    echo "cores $(nproc), RAM $(free -g | awk '/Mem/{print $2}') GiB; models in $M; shm $(df -h --output=avail /dev/shm | tail -1)"
    build_both
    split_check
    op_tests
    $(pi_patched_bin)/test-pi-sparse-ffn --perf | tee "$OUT/gather-perf.txt"
    ;;
splitcheck)
    split_check
    ;;
buffers)
    # ours at BUDGET: the planner's reserve against the compute buffers llama.cpp then allocates
    # (pp512 ubatches, KV for 544 tokens as pi-bench's prompt runs)
    BYTES=$(python3 -c "from powerinfer_gguf.bench import parse_size, ModelSizes; print(parse_size('${BUDGET:-10GiB}', ModelSizes.from_gguf('$M/$P.stock.gguf').weight_bytes))")
    $(pi_patched_bin)/llama-bench -m $M/$P.pi.gguf -ngl 99 -lm none -t 16 -p 512 -n 0 -r 1 -v \
        --override-kv powerinfer.runtime.vram_budget=int:$BYTES --override-kv powerinfer.runtime.vram_ctx=int:544 2>&1 \
        | grep -E "powerinfer: .* budget|compute buffer size|model buffer size|KV buffer size|pp512" | cut -c1-260 | tee "$OUT/$P-buffers.txt"
    el "buffers done"
    ;;
nodes)
    # where a prompt ubatch's time goes, node by node (tools/node_profile.py): ours at BUDGET, KV
    # for 544 tokens, one ubatch of 512; the F16 pair if present, else the Q4_0 one
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    F=$M/$P.pi.gguf; [ -f $F ] || F=$M/$P.q4.pi.gguf
    python3 tools/node_profile.py $F --vram-budget ${BUDGET:-10GiB} --n-ctx 544 -p 512 -t 16 --top 25 \
        --json "$OUT/$P-nodes-${BUDGET:-10GiB}.json" 2>&1 | grep -v "^llama_\|^load" | tee "$OUT/$P-nodes-${BUDGET:-10GiB}.txt"
    el "node profile done"
    ;;
synth)
    start_synth $P f16
    ;;
synthq)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    start_synth $P q4_0
    ls -la $M
    ;;
q4)
    # issue 16 on the GPU: the pair to Q4_0 with pi-quantize (ours keeps its predictors, Q8_0),
    # then pi-bench at BUDGET (default 50%: a 40B Q4_0 on an 11 GB card is ~50% of its weights):
    # decode tg128 and prompts of 64 and 512 tokens, stock's faster way against ours
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    for side in pi stock; do
        [ -f $M/$P.q4.$side.gguf ] && continue
        python3 -m powerinfer_gguf quantize $M/$P.$side.gguf $M/$P.q4.$side.gguf --int4 -t 16 2>&1 | tail -1
    done
    el "quantized"
    for p in 64 512; do
        python3 -m powerinfer_gguf bench $M/$P.q4.pi.gguf --stock $M/$P.q4.stock.gguf --vram-budget ${BUDGET:-50%} \
            -t 16 -p $p -n 128 -r 2 --ttft none --json "$OUT/$P-q4-p$p.json" 2>&1 | grep -v "^\[" | tee "$OUT/$P-q4-p$p.txt"
        el "Q4_0 at ${BUDGET:-50%}, p$p done"
    done
    ;;
serve)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    python3 -m powerinfer_gguf bench $M/$P.pi.gguf --stock $M/$P.stock.gguf --vram-budget ${BUDGET:-10GiB} -t 16 \
        --serve 1,4,8 -p 64 -n 32 -r 1 --json "$OUT/$P-serve.json" 2>&1 | grep -v "^\[" | tee "$OUT/$P-serve.txt"
    el "serve bench done"
    ;;
kernel)
    # all computed neurons firing, and 66% of them (PI_BENCH_FIRE: a real decode's precision,
    # where a third of the predicted neurons cost a gate row alone)
    kernel_rounds 3 1/16 0.66/16 > "$OUT/kernel-13b-16t.txt"
    python3 tools/kernel_summary.py "$OUT/kernel-13b-16t.txt" | tee "$OUT/kernel-13b-16t-summary.md"
    el "kernel bench done"
    # the op on CUDA against its definition in primitives and against the CPU, then its GB/s
    $(pi_patched_bin)/test-pi-sparse-ffn 2>&1 | tail -3 | tee "$OUT/pi-sparse-ffn.txt"
    T=$(pi_patched_bin)/test-backend-ops
    $T -o PI_SPARSE_FFN -b CUDA0 2>&1 | grep -E "FAIL|passed|OK$" | tail -5 | tee "$OUT/backend-ops.txt"
    for b in CUDA0 CPU; do
        $T perf -o PI_SPARSE_FFN -b $b -p "n_embd=5120," 2>&1 | grep "PI_SPARSE_FFN(" | sed 's/\x1b\[[0-9;]*m//g'
    done | tee -a "$OUT/backend-ops.txt"
    el "test-backend-ops done"
    ;;
prompt)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)  # ours is planned through the Python API
    bench() {  # pi-bench of the pair at a budget, more options after it
        local b=$1; shift
        python3 -m powerinfer_gguf bench $M/$P.pi.gguf --stock $M/$P.stock.gguf --vram-budget $b -t 16 "$@" 2>&1 | grep -v "^\["
    }
    # decode and pp512 with the KV cache of that run (as the decode figures before), then time to
    # first token of 512 and 2048 tokens (KV for 2048: fewer hot rows fit)
    for b in ${BUDGETS:-${BUDGET:-10GiB} 0}; do
        bench $b -p 512 -n 32 -r 2 --ttft none --json "$OUT/$P-pp512-${b%\%}.json" | tee "$OUT/$P-pp512-${b%\%}.txt"
        el "pp512 + tg32 at $b done"
    done
    [ "${TTFT:-1}" = 1 ] || exit 0
    bench ${BUDGET:-10GiB} -p 512 -n 8 -r 2 --ttft 512,2048 --json "$OUT/$P-ttft.json" | tee "$OUT/$P-ttft.txt"
    el "time to first token done"
    ;;
variants)
    # what in llama-bench's way of running moves each side's prompt (docs/NOTES.md, 2026-12-04):
    # pi-bench once at BUDGET for the sides' commands, then -ot and ours as pi-bench runs them,
    # with --poll 0, with -t 4 and in load mode auto (llama-bench's default), rounds interleaved
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    J=$(mktemp -d /tmp/pi-run-XXXXXX)/run.json  # a new folder: pi-bench refuses a JSON that exists
    python3 -m powerinfer_gguf bench $M/$P.pi.gguf --stock $M/$P.stock.gguf --vram-budget ${BUDGET:-10GiB} -t 16 \
        -p 512 -n 0 -r 1 --ttft none --json $J 2>&1 | grep -v "^\[" | tail -4
    [ -f $J ] || { echo "variants: pi-bench wrote no $J"; exit 1; }
    python3 tools/bench_variants.py $J --sides stock_ot,ours --variant "--poll 0" --variant "-t 4" --variant "-lm auto" -r 3 \
        | tee "$OUT/$P-variants.txt"
    # ours' one ubatch through the Python API (no thread pool attached), a fixed sequence of
    # tokens and random ones
    for tok in "" --random-tokens; do
        python3 tools/node_profile.py $M/$P.pi.gguf --vram-budget ${BUDGET:-10GiB} --n-ctx 544 -p 512 -t 16 --top 0 $tok \
            2>&1 | grep "^plain" | sed "s/^/Python API, ${tok:-fixed tokens}: /"
    done | tee -a "$OUT/$P-variants.txt"
    el "variants done"
    ;;
head)
    while [ ! -f $M/$P.synth.rc ] && [ $(( $(date +%s) - t0 )) -lt 500 ]; do sleep 5; done
    el "synth rc $(cat $M/$P.synth.rc 2>/dev/null)"; tail -3 $M/$P.synth.log | tr '\r' '\n' | tail -3
    ls -la $M
    python3 -m powerinfer_gguf bench $M/$P.pi.gguf --stock $M/$P.stock.gguf --vram-budget ${BUDGET:-40%} -t 16 \
        -p 0 -n 32 -r 2 --ttft none --json "$OUT/$P-head.json" 2>&1 | tee "$OUT/$P-head.txt" | grep -v "^\["
    el "head-to-head done"
    ;;
profile)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    # ours through llama-bench, tg32, at a budget in bytes (KV for 32 tokens), more options after it
    tg() {
        local budget=$1; shift
        $(pi_patched_bin)/llama-bench -m $M/$P.pi.gguf -ngl 99 -lm none -t 16 -p 0 -n 32 -r 2 \
            --override-kv powerinfer.runtime.vram_budget=int:$budget --override-kv powerinfer.runtime.vram_ctx=int:32 \
            "$@" 2>&1
    }
    NFF=$(python3 -c "from powerinfer_gguf.synth import PRESETS; print(PRESETS['$P'][1])")
    # everything on the GPU (72 GiB budget), then every layer split with 32 rows on the CPU
    { tg 77309411328; tg 77309411328 --override-kv powerinfer.runtime.dev_rows=int:$((NFF - 32)); } \
        | grep -E "tg32|powerinfer: .* budget" | cut -c1-220 | tee "$OUT/$P-profile.txt"
    # the CPU part's thread pool between layers: spinning (--poll 100) or sleeping (0) while the
    # GPU works, threads pinned or not (a split layer's CPU op is ~0.4 ms; a wake-up weighs there)
    BYTES=$(python3 -c "from powerinfer_gguf.bench import parse_size, ModelSizes; print(parse_size('${BUDGET:-40%}', ModelSizes.from_gguf('$M/$P.stock.gguf').weight_bytes))")
    tg $BYTES --poll 0,50,100 --cpu-strict 0,1 | grep -E "tg32| test " | cut -c1-240 | tee -a "$OUT/$P-profile.txt"
    # where a token's time goes (patches/0010): the CPU kernel's own clock, GB/s and threads, at
    # budget 0 (the CUDA build's CPU path) and at the head-to-head budget
    for b in 0 ${BUDGET:-40%}; do
        python3 -m powerinfer_gguf bench $M/$P.pi.gguf --profile --vram-budget $b -t 16 -p 16 -n 32 \
            --json "$OUT/$P-decode-profile-${b%\%}.json" > /tmp/decode-profile.txt 2>&1
        grep -E -A3 "^profile:|Error|error" /tmp/decode-profile.txt
    done | tee -a "$OUT/$P-profile.txt"
    el "profile done"
    ;;
recheck)
    # one call on a fresh machine: the patched side alone, a small model, the sparse == dense check
    # with split layers (budgets 55/70/85%) and the issue's three budgets
    python3 -m powerinfer_gguf.build setup --no-python --only patched -j 16 > "$OUT/build.log" 2>&1
    el "patched build done (rc $?)"; tail -2 "$OUT/build.log"
    python3 -m powerinfer_gguf synth /tmp/chk.stock.gguf --preset 1b --layers 8 --outtype f16 --pi /tmp/chk.pi.gguf --force \
        --calib-tokens 256 --heldout-tokens 128 2>&1 | tail -1
    el "check model done"
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    timeout 200 python3 tools/gpu_split_check.py /tmp/chk.pi.gguf 55% 85% 0 40% 100% 2>&1 \
        | grep -E "budget|Error|error|Traceback" | tee "$OUT/split-check.txt"
    el "check done"
    # the op on CUDA against its definition in primitives (and the CPU's on 1-4 threads), then
    # test-backend-ops' cases (CUDA against the CPU)
    $(pi_patched_bin)/test-pi-sparse-ffn 2>&1 | tail -4 | tee "$OUT/pi-sparse-ffn.txt"
    $(pi_patched_bin)/test-backend-ops -o PI_SPARSE_FFN -b CUDA0 2>&1 | grep -E "FAIL|passed|OK$" | tail -3 \
        | tee "$OUT/backend-ops.txt"
    el "op tests done"
    ;;
check)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    timeout 240 python3 -X faulthandler tools/gpu_split_check.py /tmp/chk.pi.gguf 2>&1 | grep -v "^llama_\|^print_info\|^load\|^gguf" | tee "$OUT/split-check.txt" | tail -40
    el "check done"
    ;;
rpc)
    # issue 20 item 4: one client and, of each build, two ggml-rpc-servers on 127.0.0.1 (this
    # machine's CUDA0, and its CPU), every layer on them by llama.cpp's split, ours against stock
    # (tools/rpc_bench.py). The Q4_0 pair of PRESET (synthq; an F16 13B would cross the loopback
    # 26 GB a run)
    export LLAMA_CPP_LIB_PATH=$(pi_patched_bin)
    SB=$(python3 -c "from powerinfer_gguf.build import build_dir; print(build_dir('stock'))" | tail -1)/bin
    pids=()
    for s in "$(pi_patched_bin) 50061 CUDA0" "$(pi_patched_bin) 50062 CPU" "$SB 50063 CUDA0" "$SB 50064 CPU"; do
        read -r bin port dev <<< "$s"
        $bin/ggml-rpc-server -p $port -d $dev -t 16 > "$OUT/rpc-server-$port.log" 2>&1 &
        pids+=($!)
    done
    sleep 5
    python3 tools/rpc_bench.py $M/$P.q4.pi.gguf --stock $M/$P.q4.stock.gguf -t 16 -p 512 -n 32 -r 2 \
        --rpc 127.0.0.1:50061,127.0.0.1:50062 --stock-rpc 127.0.0.1:50063,127.0.0.1:50064 \
        --json "$OUT/$P-q4-rpc.json" 2>&1 | tee "$OUT/$P-q4-rpc.txt"
    kill "${pids[@]}"
    el "rpc bench done"
    ;;
sweep)
    python3 -m powerinfer_gguf bench $M/$P.pi.gguf --stock $M/$P.stock.gguf --sweep 0,10%,20%,40%,70%,100% --ttft none \
        -t 16 -p 512 -n 32 -r 1 --json "$OUT/$P-sweep.json" 2>&1 | tee "$OUT/$P-sweep.txt" | grep -v "^\["
    el "sweep done"
    ;;
*)
    echo "usage: $0 build|prep|optests|splitcheck|synth|synthq|buffers|nodes|prompt|q4|serve|kernel|head|profile|sweep|rpc|recheck|check" >&2
    exit 2
    ;;
esac
