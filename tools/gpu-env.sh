# Sourced by the GPU-machine scripts (tools/gpu-*.sh): the carried source pack as the sdist, offline;
# gguf-py and llama-cpp-python's Python part from that pack on PYTHONPATH (pi-convert and
# powerinfer_gguf.Llama use them over our patched libllama: LLAMA_CPP_LIB_PATH once it is built).
# llama_cpp imports diskcache at import time (for LlamaDiskCache, which nothing here uses) and that
# machine has no diskcache: a stand-in module that refuses to be used.
export PI_CACHE=/tmp/pi-cache PI_SDIST=$PWD/.gpu/llama-src.tar.xz PI_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
GGUF_PY=$(python3 -c "from powerinfer_gguf import build; print(build.stock_llama_source() / 'gguf-py')" | tail -1) || exit 1
STOCK_SRC=$(python3 -c "from powerinfer_gguf import build; print(build.stock_source())" | tail -1)
SHIM=/tmp/pi-shims
mkdir -p $SHIM
printf 'class Cache:\n    def __init__(self, *a, **k):\n        raise RuntimeError("diskcache is not installed on this machine")\n' > $SHIM/diskcache.py
export PYTHONPATH=$PWD:$GGUF_PY:$(readlink -f "$STOCK_SRC"):$SHIM
pi_patched_bin() { echo "$(python3 -c "from powerinfer_gguf.build import build_dir; print(build_dir('patched'))" | tail -1)/bin"; }
