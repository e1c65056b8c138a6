"""The sides of a pi-bench run again, each with variants of llama-bench's settings, rounds
interleaved: what in llama-bench's way of running moves a side's prompt speed (its thread pool's
polling, the number of threads), side by side in one call.

    PYTHONPATH=. python tools/bench_variants.py RUN.json [--variant "--poll 0"] [--variant "-t 4"] [--variant "-lm auto"]
        [-p 512] [-r 3] [--sides ours,stock_ot]

RUN.json: pi-bench's --json of the same machine and files (each side's binary, file and arguments
as pi-bench ran them). A variant is llama-bench options, each with a value: one the side has gets
the variant's value instead (llama-bench runs every value an option is given), "-t N" the threads.
The first column is pi-bench's own setting. Prints, per side and variant, the median pp t/s of the rounds and each round's figure.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from powerinfer_gguf.bench.runner import llama_bench_once  # noqa: E402


def apply_variant(args: list[str], threads: int, variant: str) -> tuple[list[str], int]:
    """A side's arguments and threads with a variant's options (each with one value) set: an
    option the side already has gets the variant's value (llama-bench would run both), -t sets
    the threads, any other is added"""
    opts = shlex.split(variant)
    if len(opts) % 2:
        raise SystemExit(f"bench_variants: {variant!r}: give each option one value")
    args = list(args)
    for opt, val in zip(opts[::2], opts[1::2]):
        if opt == "-t":
            if not val.isdigit():
                raise SystemExit(f"bench_variants: -t needs a number in {variant!r}")
            threads = int(val)
        elif opt in args:
            args[args.index(opt) + 1] = val
        else:
            args += [opt, val]
    return args, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--sides", default="")
    a = ap.parse_args()
    run = json.loads(Path(a.run).read_text())
    names = [s for s in (a.sides.split(",") if a.sides else ["stock", "stock_ot", "ours"]) if s in run]
    if not names:
        raise SystemExit(f"bench_variants: none of the sides {a.sides or 'stock, stock_ot, ours'} in {a.run}")
    variants = [""] + a.variant
    tps: dict[tuple[str, str], list[float]] = {(s, v): [] for s in names for v in variants}
    for r in range(a.rounds):
        for s in names:
            side = run[s]
            for v in variants:
                args, threads = apply_variant(side["args"], run["threads"], v)
                pp, _ = llama_bench_once(side["binary"], side["model"], args, [a.n_prompt], 0, threads)
                tps[(s, v)].append(pp[a.n_prompt])
                print(f"round {r + 1} {s} [{v or 'as pi-bench'}]: pp{a.n_prompt} {pp[a.n_prompt]:.1f}", flush=True)
    print(f"\n| side | " + " | ".join(v or "as pi-bench" for v in variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for s in names:
        cells = [f"{statistics.median(tps[(s, v)]):.0f} ({', '.join(f'{x:.0f}' for x in tps[(s, v)])})" for v in variants]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
