#!/usr/bin/env bash
# Sparse == dense on the GPU machine through llama-completion (greedy text, 48 tokens): dense FFN on
# the CPU against every neuron forced active (and predicted-sparse) at budgets 0, 40%, 100%.
set -uo pipefail
M=${1:-/tmp/chk.pi.gguf}
B=${PI_CACHE:-/tmp/pi-cache}/build/$(ls ${PI_CACHE:-/tmp/pi-cache}/build | grep '^patched' | head -1)/bin
W=$(python3 -c "from powerinfer_gguf.bench import ModelSizes; print(ModelSizes.from_gguf('$M').weight_bytes)")
run() { $B/llama-completion -m "$M" -p "The history of the language" -n 48 --temp 0 -t 16 -c 128 -no-cnv \
          --no-warmup --override-kv powerinfer.runtime.vram_ctx=int:128 "$@" 2>/dev/null; }
ref=$(run -ngl 0 --override-kv powerinfer.runtime.sparse=bool:false)
echo "reference (dense FFN, CPU): ${ref:0:120}..."
for pct in 0 40 100; do
  b=$(( W * pct / 100 ))
  args=(-ngl 0); [ $pct -gt 0 ] && args=(-ngl 99 --override-kv powerinfer.runtime.vram_budget=int:$b)
  for mode in all_active=bool:true sparse=bool:false all_active=bool:false; do
    out=$(run "${args[@]}" --override-kv powerinfer.runtime.$mode)
    same=$([ "$out" = "$ref" ] && echo "equal" || echo "DIFFERS")
    echo "budget ${pct}% ($b bytes) $mode: $same"
  done
done
