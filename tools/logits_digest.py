"""Digest of the logits a model gives, per engine configuration: for checking that a change of the
engine's code leaves every bit of the output as it was (run before and after, compare the lines).

    python tools/logits_digest.py MODEL.pi.gguf [-t THREADS] [--dev-rows N]   (PYTHONPATH: the checkout)

Each configuration evaluates the same 48-token prompt as one ubatch, then 8 greedy decode steps,
and prints the sha256 of all logits (float32) with the greedy tokens. Configurations: sparse (the
default), all_active, dense (sparse=False), with --dev-rows a split of every layer's rows, and
with --plan a VRAM budget planned without a GPU (no compute reserve): the planner's split of each
layer (both parts in CPU memory), whose rows per layer are printed too.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np



def digest(path: str, threads: int, **kw) -> tuple[str, list[int], list[int]]:
    from powerinfer_gguf import Llama

    llm = Llama(path, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False, **kw)
    n_vocab = llm.n_vocab()
    prompt = [1] + [(i * 7919) % (n_vocab - 3) + 3 for i in range(47)]
    h = hashlib.sha256()
    rows = [p.dev_rows for p in llm.placement()]
    llm.eval(prompt)
    h.update(np.ascontiguousarray(llm.scores[: llm.n_tokens], dtype=np.float32).tobytes())
    picks = []
    for _ in range(8):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        picks.append(tok)
        llm.eval([tok])
        h.update(np.ascontiguousarray(llm.scores[llm.n_tokens - 1], dtype=np.float32).tobytes())
    llm.close()
    return h.hexdigest()[:16], picks, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--dev-rows", type=int, default=None, help="also split every layer's rows here")
    ap.add_argument("--plan", default=None, help="also plan this VRAM budget (e.g. 60%%) without a GPU")
    a = ap.parse_args()
    configs = {"sparse": {}, "all_active": {"all_active": True}, "dense": {"sparse": False}}
    if a.dev_rows is not None:
        configs["split"] = {"kv_overrides": {"powerinfer.runtime.dev_rows": a.dev_rows}}
    if a.plan is not None:
        configs["plan"] = {"vram_budget": a.plan, "kv_overrides": {"powerinfer.runtime.plan_without_gpu": True,
                                                                   "powerinfer.runtime.vram_reserve": 0}}
    for name, kw in configs.items():
        d, picks, rows = digest(a.model, a.threads, **kw)
        print(f"{os.path.basename(a.model)} t={a.threads} {name:10s} {d} {picks}" + (f" rows {rows}" if name == "plan" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
