#!/usr/bin/env bash
# The loader's corrupt-file cases (tests/loader_cases.py) under AddressSanitizer: builds the patched
# libraries once more with -fsanitize=address (a separate build folder; ~5 min on 2 cores), then
# loads every case through llama-cpp-python with that library preloaded. Any out-of-bounds access
# aborts with an ASan report instead of passing silently.
#   tools/asan-loader.sh MODEL.pi.gguf      (an F32/F16 file of ours, e.g. a tiny pi-convert output)
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(readlink -f "$1")
PY=${PY:-.venv/bin/python}
read -r src out hash flags < <($PY - <<'PYEOF'
from powerinfer_gguf import build
cfg = build.detect_config()
out = build.build_dir("patched", cfg).with_name(build.build_dir("patched", cfg).name + "-asan")
flags = cfg.cmake_flags(True) + [f"-DLLAMA_PI_PATCHES={build.patches_hash()}"]
print(build.patched_source(), out, build.patches_hash(), " ".join(flags))
PYEOF
)
if [ ! -f "$out/.asan-$hash" ]; then
    gen=""; command -v ninja > /dev/null && gen="-G Ninja"
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$out" $gen $flags -DLLAMA_SANITIZE_ADDRESS=ON > "$out.log" 2>&1
    cmake --build "$out" -j "$(nproc)" --target llama >> "$out.log" 2>&1
    touch "$out/.asan-$hash"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "ASan build: $out/bin; cases in $work"
# libstdc++ preloaded too: python is not C++, and ASan's __cxa_throw interceptor needs the real one
# at start-up (else every C++ exception, i.e. every clean load error, aborts). Reports go to files:
# llama-cpp-python silences stderr while loading.
status=0
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0:log_path="$work/asan" \
    LLAMA_CPP_LIB_PATH="$out/bin" PYTHONPATH=. "$PY" tests/loader_cases.py "$work/cases" "$model" > "$work/log.txt" 2>&1 \
    || status=$?
reports=$(cat "$work"/asan.* 2>/dev/null | grep -c "ERROR: AddressSanitizer" || true)
echo "cases: $(grep -c '^CASE' "$work/log.txt"), errors: $(grep -c -- '-> ERR' "$work/log.txt"), ran: $(grep -c -- '-> RAN' "$work/log.txt"), ASan reports: $reports, exit status $status"
if [ "$status" != 0 ] || [ "$reports" != 0 ] || [ "$(tail -1 "$work/log.txt")" != DONE ]; then
    echo "FAILED: last case $(grep '^START' "$work/log.txt" | tail -1)"
    cat "$work"/asan.* 2>/dev/null | head -40
    exit 1
fi
