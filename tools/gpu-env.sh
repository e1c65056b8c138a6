# Sourced by the GPU-machine scripts (tools/gpu-*.sh): the carried source pack as the sdist, offline;
# gguf-py and llama-cpp-python's Python part from that pack on PYTHONPATH (pi-convert and
# powerinfer_gguf.Llama use them over our patched libllama: LLAMA_CPP_LIB_PATH once it is built).
# llama_cpp imports diskcache at import time (for LlamaDiskCache, which nothing here uses) and that
# machine has no diskcache: a stand-in module that refuses to be used.
# PI_CUDA_FA=0: both sides built without FlashAttention kernels (a faster build), the build folders
# named for it (-nofa): every script that sources this one finds the same build
export PI_CACHE=/tmp/pi-cache PI_SDIST=$PWD/.gpu/llama-src.tar.xz PI_OFFLINE=1 PYTHONUNBUFFERED=1 PI_CUDA_FA=${PI_CUDA_FA:-0}
export PYTHONPATH=$PWD
GGUF_PY=$(python3 -c "from powerinfer_gguf import build; print(build.stock_llama_source() / 'gguf-py')" | tail -1) || exit 1
STOCK_SRC=$(python3 -c "from powerinfer_gguf import build; print(build.stock_source())" | tail -1)
SHIM=/tmp/pi-shims
mkdir -p $SHIM
printf 'class Cache:\n    def __init__(self, *a, **k):\n        raise RuntimeError("diskcache is not installed on this machine")\n' > $SHIM/diskcache.py
export PYTHONPATH=$PWD:$GGUF_PY:$(readlink -f "$STOCK_SRC"):$SHIM
# results folder (the device tool's $OUT) and elapsed-time log lines of the calling script
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# interleaved rounds of tools/kernel-bench.sh (13B rows, 8 layers, 2 MB pages; single figures move
# by 5-10% on that machine), one line per result: "cfg=<fire>/<threads> round=N | ...", as
# tools/kernel_summary.py reads them (fire: share of computed neurons that fire):
#   kernel_rounds ROUNDS CFG...
kernel_rounds() {
    local rounds=$1 round cfg; shift
    for round in $(seq 1 "$rounds"); do
        for cfg in "$@"; do
            IFS=/ read -r fire threads <<< "$cfg"
            PI_BENCH_FIRE=$fire PI_BENCH_HUGEPAGES=1 \
                PY=python3 OUT_DIR=/tmp tools/kernel-bench.sh 5120 13824 8 "$threads" 5 0.00008 0.05 0.1 0.2 2>&1 \
                | grep -E "^\| (dense|[0-9]+%)" | sed "s#^#cfg=$cfg round=$round #"
        done
        el "round $round done" >&2
    done
}
pi_patched_bin() { echo "$(python3 -c "from powerinfer_gguf.build import build_dir; print(build_dir('patched'))" | tail -1)/bin"; }
