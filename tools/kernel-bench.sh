#!/usr/bin/env bash
# Build tools/pi_kernel_bench.cpp against the patched libggml of this checkout's set-up and run it:
# GB/s of rows the sparse kernel reads against dense streaming (see the .cpp for what is timed).
#   tools/kernel-bench.sh [n_embd n_ff n_layer threads reps share...]
# Default: 13B rows (5120 x 13824), 8 layers (1.7 GB of F16 rows), all cores, 5 reps, 5/10/20%.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUILD=$($PY -c "from powerinfer_gguf.build import build_dir; print(build_dir('patched'))")
SRC=vendor/llama.cpp
OUT=${OUT_DIR:-/tmp}/pi_kernel_bench
# built once per source and library (a series of runs calls this many times)
if [ ! -x "$OUT" ] || [ tools/pi_kernel_bench.cpp -nt "$OUT" ] || [ "$BUILD/bin/libggml-cpu.so" -nt "$OUT" ]; then
    g++ -O2 -std=c++17 -o "$OUT" tools/pi_kernel_bench.cpp -I"$SRC/ggml/include" \
        -L"$BUILD/bin" -lggml-cpu -lggml-base -Wl,-rpath,"$BUILD/bin"
fi
if [ $# -eq 0 ]; then
    set -- 5120 13824 8 "$(nproc)" 5 0.05 0.1 0.2
fi
"$OUT" "$@"
