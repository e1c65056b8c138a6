"""The sides of a pi-bench run again, each with variants of llama-bench's settings, rounds
interleaved: what in llama-bench's way of running moves a side's prompt speed (its thread pool's
polling, the number of threads), side by side in one call.

    PYTHONPATH=. python tools/bench_variants.py RUN.json [--variant "--poll 0"] [--variant "-t 4"]
        [--variant "-lm auto"] [-p 512] [-r 3] [--sides ours,stock_ot]

RUN.json: pi-bench's --json of the same machine and files (each side's binary, file and arguments
as pi-bench ran them). A variant is llama-bench options, each with a value: one the side has gets
the variant's value instead (llama-bench runs every value an option is given), "-t N" the threads.
The first column is pi-bench's own setting. Prints, per side and variant, the median pp t/s of
the rounds and each round's figure.
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


def read_run(path: str, sides: str) -> tuple[dict, list[str]]:
    """pi-bench's JSON and the sides asked for (all it has when none are named)"""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench_variants: {path}: not a pi-bench JSON ({e.__class__.__name__})") from None
    have = [s for s in ("stock", "stock_ot", "ours") if isinstance(run.get(s), dict)]
    names = sides.split(",") if sides else have
    unknown = [s for s in names if s not in have]
    if unknown or not names:
        raise SystemExit(f"bench_variants: {path} has the sides {', '.join(have) or 'none'}, not {', '.join(unknown)}")
    return run, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--sides", default="")
    a = ap.parse_args()
    if a.n_prompt < 1 or a.rounds < 1:
        raise SystemExit("bench_variants: -p and -r must be at least 1")
    run, names = read_run(a.run, a.sides)
    variants = list(dict.fromkeys([""] + a.variant))  # each once, pi-bench's own first
    plans = {(s, v): apply_variant(run[s]["args"], run["threads"], v) for s in names for v in variants}
    tps: dict[tuple[str, str], list[float]] = {key: [] for key in plans}
    for r in range(a.rounds):
        for s in names:
            for v in variants:
                args, threads = plans[(s, v)]
                try:
                    pp, _ = llama_bench_once(run[s]["binary"], run[s]["model"], args, [a.n_prompt], 0, threads)
                except (RuntimeError, OSError) as e:
                    raise SystemExit(f"bench_variants: {s} [{v or 'as pi-bench'}]: {e}") from None
                tps[(s, v)].append(pp[a.n_prompt])
                print(f"round {r + 1} {s} [{v or 'as pi-bench'}]: pp{a.n_prompt} {pp[a.n_prompt]:.1f}", flush=True)
    print("\n| side | " + " | ".join(v or "as pi-bench" for v in variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for s in names:
        cells = [f"{statistics.median(tps[(s, v)]):.0f} ({', '.join(f'{x:.0f}' for x in tps[(s, v)])})" for v in variants]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
