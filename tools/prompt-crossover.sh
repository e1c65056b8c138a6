#!/usr/bin/env bash
# Prompt processing: where does the sparse FFN stop beating the dense one? Prompt tokens/s of one
# ubatch of N tokens through our file with every ubatch sparse (sparse_max_tokens = 1M) or dense
# (sparse_max_tokens = 0), and stock llama.cpp on the twin, for N in a list:
#   tools/prompt-crossover.sh OURS.gguf TWIN.gguf THREADS [N...]
set -euo pipefail
cd "$(dirname "$0")/.."
ours=$1 twin=$2 threads=$3; shift 3
[ $# -gt 0 ] || set -- 8 16 32 64 128 256 512
PY=${PY:-.venv/bin/python}
P=$($PY -c "from powerinfer_gguf.build import build_dir; print(build_dir('patched'))" | tail -1)/bin
S=$($PY -c "from powerinfer_gguf.build import build_dir; print(build_dir('stock'))" | tail -1)/bin
tps() { grep -E "prompt eval time" | sed -E 's/.*tokens \( *[0-9.]+ ms per token, *([0-9.]+) tokens per second.*/\1/'; }
echo "| prompt tokens | ours sparse t/s | ours dense t/s | stock t/s | sparse/stock | dense/stock |"
echo "|---:|---:|---:|---:|---:|---:|"
for n in "$@"; do
    # ~n tokens of text: the llama vocab gives about 1.3 tokens per word here
    prompt=$($PY -c "import sys; w='the history of every language is long and full of change'.split(); n=int(sys.argv[1]); print(' '.join((w*(n//len(w)+2))[:max(1,int(n/1.25))]))" "$n")
    run() { "$@" -t "$threads" -p "$prompt" -n 1 -no-cnv --temp 0 -c 1024 -b 1024 -ub 1024 2>&1 | tps; }
    sp=$(run "$P/llama-completion" -m "$ours" --override-kv powerinfer.runtime.sparse_max_tokens=int:1048576)
    de=$(run "$P/llama-completion" -m "$ours" --override-kv powerinfer.runtime.sparse_max_tokens=int:0)
    st=$(run "$S/llama-completion" -m "$twin")
    awk -v n="$n" -v a="$sp" -v b="$de" -v c="$st" 'BEGIN{printf "| %d | %.1f | %.1f | %.1f | %.2f | %.2f |\n", n, a, b, c, a/c, b/c}'
done
