"""Probe: which part of a GPU/CPU split disagrees with the CPU dense reference (tools/gpu-split.sh)."""
import sys
from powerinfer_gguf import Llama
Llama = Llama
import numpy as np  # noqa: E402

T = [1, 15043, 3186, 29892, 445, 338, 263, 1243]


def lg(budget, **kv):
    m = Llama(sys.argv[1], vram_budget=budget, n_ctx=64, n_threads=16, verbose=False, logits_all=True, kv_overrides=kv)
    for t in T:
        m.eval([t])
    out = np.array(m.scores[:len(T)])
    m.close()
    return out


ref = lg(0, **{"powerinfer.runtime.sparse": False})
for name, b, kv in [("cpu split all_active", 0, {"powerinfer.runtime.all_active": True, "powerinfer.runtime.dev_rows": 2752}),
                    ("gpu split all_active", "100%", {"powerinfer.runtime.all_active": True, "powerinfer.runtime.dev_rows": 2752}),
                    ("gpu split dense", "100%", {"powerinfer.runtime.sparse": False, "powerinfer.runtime.dev_rows": 2752}),
                    ("gpu all hot rows=0", "100%", {"powerinfer.runtime.all_active": True, "powerinfer.runtime.dev_rows": 0}),
                    ("gpu split rows=5472", "100%", {"powerinfer.runtime.all_active": True, "powerinfer.runtime.dev_rows": 5472})]:
    x = lg(b, **kv)
    print(name, float(np.abs(x - ref).max() / np.abs(ref).max()), float((x.argmax(-1) == ref.argmax(-1)).mean()), flush=True)
