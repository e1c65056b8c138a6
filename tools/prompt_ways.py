"""Prompt speed (-ngl 0) of each way the sparse FFN can run a ubatch, against stock on the twin:
the crossovers behind the CPU kernel's choice between pairs and tiles (docs/NOTES.md). On a GPU
machine large ubatches still go to the GPU with -ngl 0, on both sides.

    PYTHONPATH=. python tools/prompt_ways.py OURS.gguf TWIN.gguf [-t 2] [-r 3] [-p 16,64,512]

One llama-bench run per side, prompt size and round; rounds interleave the sides so a slow spell
of the machine touches them all. Prints prompt t/s (mean +- sd over rounds) and each side / stock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess

from powerinfer_gguf.build import build_dir

WAYS = ("auto", "pairs", "tiles", "dense")


def one_run(binary: str, model: str, n: int, threads: int, way: str | None) -> float:
    args = [binary, "-m", model, "-ngl", "0", "-t", str(threads), "-p", str(n), "-n", "0", "-r", "1",
            "-b", str(n), "-ub", str(n), "-lm", "none", "-o", "json"]
    if way is not None:
        args += ["--override-kv", f"powerinfer.runtime.ffn_way=str:{way}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("twin")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-p", "--prompts", default="16,64,512")
    a = ap.parse_args()
    sizes = [int(x) for x in a.prompts.split(",")]
    ours, stock = str(build_dir("patched") / "bin" / "llama-bench"), str(build_dir("stock") / "bin" / "llama-bench")
    tps: dict[tuple[int, str], list[float]] = {}
    for _ in range(a.rounds):
        for n in sizes:
            tps.setdefault((n, "stock"), []).append(one_run(stock, a.twin, n, a.threads, None))
            for way in WAYS:
                tps.setdefault((n, way), []).append(one_run(ours, a.ours, n, a.threads, way))
    print("| prompt | stock t/s | " + " | ".join(f"{w} t/s (x stock)" for w in WAYS) + " |")
    print("|---:|---:|" + "---:|" * len(WAYS))
    for n in sizes:
        st = statistics.mean(tps[(n, "stock")])
        cells = []
        for w in WAYS:
            xs = tps[(n, w)]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.1f} +- {sd:.1f} ({statistics.mean(xs) / st:.2f}x)")
        print(f"| {n} | {st:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
