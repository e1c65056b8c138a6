"""Where the CPU kernel's tiles beat its pairs: the crossover behind GGML_PI_TILE_GAIN.

    PYTHONPATH=. python tools/tile_crossover.py MODEL.pi.gguf [-t 2] [-r 3] [-n 16,64,512]

For prompts of N tokens (one ubatch), with the file's predictors and with every neuron active,
the kernel's own time (all layers, summed) with each way forced, rounds interleaved, and the fill:
selected (row, token) pairs / (union of selected rows x tokens). Tiles cost union x tokens, pairs
cost the pairs: the fill where their times cross is 1 / GAIN.
"""
from __future__ import annotations

import argparse
import statistics

from powerinfer_gguf import Llama

TEXT = ("The history of every language is long and full of change. Words move between peoples, "
        "sounds shift over centuries, and grammar bends to new needs. ") * 64


def kernel_ms(llm, tokens) -> tuple[float, float]:
    """Kernel time of one ubatch (ms, all layers) and its fill."""
    llm.reset()
    llm.reset_sparse_stats()
    llm.eval(tokens)
    st = llm.sparse_stats()
    pairs = sum(s.predicted for s in st)
    cells = sum(s.cpu_union * s.tokens for s in st)  # the last layer runs the output token alone
    return sum(s.cpu_ns for s in st) / 1e6, pairs / cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-n", "--sizes", default="16,64,512")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    n_max = max(sizes)
    llms = {(way, full): Llama(a.model, ffn_way=way, all_active=full, n_ctx=n_max, n_batch=n_max, n_ubatch=n_max,
                               n_threads=a.threads, verbose=False)
            for way in ("pairs", "tiles") for full in (False, True)}
    toks = llms[("pairs", False)].tokenize(TEXT.encode())
    ms: dict[tuple, list[float]] = {}
    fill: dict[tuple, float] = {}
    for _ in range(a.rounds):
        for n in sizes:
            for (way, full), llm in llms.items():
                t, f = kernel_ms(llm, toks[:n])
                ms.setdefault((n, full, way), []).append(t)
                fill[(n, full)] = f
    print("| tokens | selection | fill | pairs ms | tiles ms | pairs/tiles |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        for full in (False, True):
            p, t = (statistics.median(ms[(n, full, w)]) for w in ("pairs", "tiles"))
            print(f"| {n} | {'all active' if full else 'predicted'} | {fill[(n, full)]:.3f} | {p:.1f} | {t:.1f} | {p / t:.2f} |")


if __name__ == "__main__":
    main()
