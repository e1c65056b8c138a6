#!/usr/bin/env python3
"""Stock llama.cpp, PowerInfer and ours on the same weights at one budget (issue 19), each timed by
its own completion tool's counters (prompt eval / eval), rounds interleaving the engines:
- stock: the stock build's llama-completion on the twin, in each of stock's ways at the budget
  (-ngl, -ot: pi-bench's plans), the faster per measure;
- ours: the patched build's llama-completion on our file, the budget as run-time keys;
- PowerInfer: its main on our file in its format (tools/powerinfer_peer.py), --vram-budget, its
  .generated.gpuidx beside the file.
Measures: decode t/s of -n tokens after prompts of 1 and 64 tokens (PowerInfer's paper's setting)
and prompt t/s at 512 tokens. Every prompt is the word " the" repeated (the same tokens for all).
  tools/peer_bench.py OURS.pi.gguf TWIN.gguf PEER.gguf --powerinfer PowerInfer/build/bin/main
                      [--budget-gib 0] [-t N] [-n 128] [-r 2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_T = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms /\s*(\d+) tokens")
EVAL_T = re.compile(r"\beval time\s*=\s*([\d.]+) ms /\s*(\d+) runs")
MEASURES = [("tg after 1", 1, "gen"), ("tg after 64", 64, "gen"), ("pp512", 512, "prompt")]


def timings(out: str) -> tuple[float, float]:
    """(prompt t/s, decode t/s) from a llama.cpp-family tool's perf print."""
    p, e = PROMPT_T.search(out), EVAL_T.search(out)
    if not p or not e:
        raise RuntimeError("no timings in the output: " + out.strip().splitlines()[-1][:200] if out.strip() else "no output")
    rate = lambda m: int(m.group(2)) / float(m.group(1)) * 1e3 if float(m.group(1)) > 0 else 0.0  # noqa: E731
    return rate(p), rate(e)


def engines(ours: str, twin: str, peer: str, powerinfer: str, budget: int, threads: int, n_ctx: int) -> dict:
    """Each engine's command up to the prompt and token count."""
    from powerinfer_gguf.bench.stock import stock_sides
    from powerinfer_gguf.build import bin_path
    from powerinfer_gguf.format import Keys
    from powerinfer_gguf.model_file import ModelSizes

    common = ["-t", str(threads), "-c", str(n_ctx), "--temp", "0", "--ignore-eos", "--repeat-penalty", "1.0"]
    llama = common + ["-no-cnv", "-lm", "none"]
    stock_bin = str(bin_path("stock", "llama-completion"))
    out = {name: [stock_bin, "-m", twin, *llama, *[a for a in s.args if a not in ("-lm", "none")]]
           for name, s in stock_sides(ModelSizes.from_gguf(twin), twin, stock_bin, budget, n_ctx).items()}
    ours_args = ["-ngl", "999", "-fit", "off", "--override-kv",
                 f"{Keys.Runtime.VRAM_BUDGET}=int:{budget},{Keys.Runtime.VRAM_CTX}=int:{n_ctx}"] if budget else []
    out["ours"] = [str(bin_path("patched", "llama-completion")), "-m", ours, *llama, *ours_args]
    # --log-disable: its main would write main.log into the working folder
    out["powerinfer"] = [powerinfer, "-m", peer, *common, "--log-disable"] + (["--vram-budget", f"{budget / 2**30:.3f}"] if budget else [])
    return out


def run(cmd: list[str], n_prompt: int, n_gen: int) -> tuple[float, float]:
    prompt = " the" * (n_prompt - 1) if n_prompt > 1 else " the"
    r = subprocess.run(cmd + ["-p", prompt, "-n", str(n_gen)], capture_output=True, text=True, errors="replace", timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return timings(r.stdout + r.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours")
    ap.add_argument("twin")
    ap.add_argument("peer")
    ap.add_argument("--powerinfer", required=True, help="PowerInfer's main")
    ap.add_argument("--budget-gib", type=float, default=0.0)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    for f in (a.ours, a.twin, a.peer, a.powerinfer):
        if not Path(f).is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 1
    if a.json and Path(a.json).exists():
        print(f"error: {a.json} exists (remove it first)", file=sys.stderr)
        return 1
    budget = int(a.budget_gib * 2**30)
    cmds = engines(a.ours, a.twin, a.peer, a.powerinfer, budget, a.threads, 512 + a.n_gen + 16)
    res: dict[str, dict[str, list[float]]] = {e: {m: [] for m, _, _ in MEASURES} for e in cmds}
    for rep in range(a.repetitions):
        for label, n_prompt, which in MEASURES:
            for e, cmd in cmds.items():  # engines interleaved within every measure and round
                pp, tg = run(cmd, n_prompt, a.n_gen if which == "gen" else 1)
                res[e][label].append(pp if which == "prompt" else tg)
                print(f"round {rep + 1}, {label}: {e} {res[e][label][-1]:.2f} t/s", file=sys.stderr)
    best = {e: {m: max(v) for m, v in ms.items()} for e, ms in res.items()}
    stock = {m: max(v[m] for e, v in best.items() if e.startswith("stock")) for m, _, _ in MEASURES}
    print(f"budget {a.budget_gib:g} GiB, {a.threads} threads, decode of {a.n_gen} tokens, best of {a.repetitions}")
    print("| engine | " + " | ".join(f"{m} t/s" for m, _, _ in MEASURES) + " |")
    print("|---|" + "---:|" * len(MEASURES))
    for e in best:
        print(f"| {e} | " + " | ".join(f"{best[e][m]:.2f}" for m, _, _ in MEASURES) + " |")
    for ref, vals in (("stock's faster way", stock), ("PowerInfer", best["powerinfer"])):
        print(f"| ours / {ref} | " + " | ".join(f"**{best['ours'][m] / vals[m]:.2f}x**" for m, _, _ in MEASURES) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"budget_gib": a.budget_gib, "threads": a.threads, "n_gen": a.n_gen,
                                            "samples": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
