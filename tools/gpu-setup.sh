#!/usr/bin/env bash
# On the GPU machine (device tool): build patched + stock llama.cpp with CUDA from the carried source
# pack, then check that both run on the GPU. Here, first:
#     python -m powerinfer_gguf.build pack -o .gpu/llama-src.tar.xz     (.gpu/ is gitignored)
# and carry .gpu in the device call. Environment: JOBS (16), PI_CUDA_FA (here 0: leaves the
# FlashAttention kernels out: ~40% less compile time, both sides alike).
set -euo pipefail
cd "$(dirname "$0")/.."
export PI_CACHE=${PI_CACHE:-/tmp/pi-cache} PI_SDIST=${PI_SDIST:-$PWD/.gpu/llama-src.tar.xz} PI_OFFLINE=1
export PI_CUDA_FA=${PI_CUDA_FA:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader
echo "cores: $(nproc), RAM: $(free -g | awk '/Mem/{print $2}') GiB, python: $(python3 --version)"
t0=$(date +%s)
python3 -m powerinfer_gguf.build setup --no-python -j "${JOBS:-16}" --sides-at-once
echo "set-up (both sides, CUDA): $(( $(date +%s) - t0 )) s"
# gguf-py from the pack, for pi-synth / pi-bench here
GGUF_PY=$(python3 -c "from powerinfer_gguf import build; print(build.stock_llama_source() / 'gguf-py')" | tail -1)
export PYTHONPATH=$PYTHONPATH:$GGUF_PY
python3 -m powerinfer_gguf.build paths
