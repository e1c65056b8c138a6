"""On the GPU machine: sparse == dense with every neuron forced active, at VRAM budgets 0, 40% and
100% of the weights (tools/gpu-split.sh). Logits of our file on the GPU against the dense FFN on
the CPU, decode (one token per eval: the GPU's sparse kernel) and a 6-token ubatch (the kernel's
multi-token path); predicted-sparse decode as well, for its agreement with dense."""
from __future__ import annotations

import sys

# llama.cpp's libraries before numpy's: in the GPU machine's Python (PyTorch's venv, numpy 2.5)
# numpy first and then libggml segfaults at load, with no Python frame to show
from powerinfer_gguf import Llama  # noqa: E402  (resolved lazily: force it now)
Llama = Llama
import numpy as np  # noqa: E402

TOKENS = [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889, 450, 4996, 17354]


def logits(path, budget, one_by_one, **kw):
    llm = Llama(path, vram_budget=budget, n_ctx=64, n_batch=64, n_threads=16, verbose=False, logits_all=True, **kw)
    if one_by_one:
        for t in TOKENS:
            llm.eval([t])
    else:
        for i in range(0, len(TOKENS), 6):
            llm.eval(TOKENS[i:i + 6])
    out = np.array(llm.scores[: len(TOKENS)])
    pl = llm.placement()
    llm.close()
    return out, pl


def main(path: str, budgets: list[str]) -> int:
    ok = True
    for one in (True, False):
        ref, _ = logits(path, 0, one, sparse=False)
        scale = np.abs(ref).max()
        for budget in budgets:
            full, pl = logits(path, budget, one, all_active=True)
            sparse, _ = logits(path, budget, one)
            err = float(np.abs(full - ref).max() / scale)
            agree = float((full.argmax(-1) == ref.argmax(-1)).mean())
            s_agree = float((sparse.argmax(-1) == ref.argmax(-1)).mean())
            gpu_rows = sum(p.gpu_rows for p in pl)
            rows = sum(p.neurons for p in pl)
            good = err < 2e-3 and agree == 1.0
            ok &= good
            print(f"{'decode' if one else 'ubatch 6'} budget {budget:>4}: layers with attention on GPU "
                  f"{sum(p.attn_gpu for p in pl)}/{len(pl)}, split {sum(p.split for p in pl)}, FFN rows on GPU "
                  f"{gpu_rows}/{rows}: all-active vs dense (CPU) max|dlogit|/max|logit| {err:.2e}, argmax equal "
                  f"{agree:.0%}; predicted-sparse argmax equal {s_agree:.0%} {'OK' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:] or ["0", "40%", "100%"]))
