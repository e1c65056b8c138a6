"""Ours against stock llama.cpp over llama.cpp's RPC backend, the same layout on both sides.

Issue 20: every layer on the hosts'
devices (-ngl 99 --rpc, llama.cpp's own split between hosts, the same layout on both sides), and
each side run here without RPC, rounds interleaved (llama-bench, one repetition a run). Prints
prompt and decode t/s, ours / stock over RPC and here, and what RPC costs a decoded token (1/tg over
RPC - 1/tg here), per hand-off between hosts and per layer.

    .venv/bin/python tools/rpc_bench.py OURS.gguf --stock TWIN.gguf [-t 2] [-p 64] [-n 32] [-r 3]
        [--hosts 2 | --rpc HOST:PORT,... --stock-rpc HOST:PORT,...] [--json OUT.json]

Without --rpc it starts --hosts ggml-rpc-servers of each build on 127.0.0.1 (their CPU, -t threads
each), standing in for hosts. With --rpc, the servers run elsewhere: ours' build at --rpc, stock's
at --stock-rpc (each build speaks its own protocol), with the devices each was started with.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile

from powerinfer_gguf import build
from powerinfer_gguf.bench.runner import llama_bench_once
from powerinfer_gguf.model_file import ModelSizes, check_gguf
from powerinfer_gguf.rpc import STOCK_PROTOCOL_MAJOR, check_server, device_count, local_server, server_version

SIDES = ("ours", "stock")
WHERE = ("here", "rpc")


def endpoints(text: str | None) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()] if text else []


def check_args(a) -> None:
    for path in (a.model, a.stock):
        check_gguf(path)
    if ModelSizes.from_gguf(a.model).sparse is None:
        raise SystemExit(f"rpc_bench: {a.model} has no sparse layout: give ours first, its twin with --stock")
    if bool(a.rpc) != bool(a.stock_rpc):
        raise SystemExit("rpc_bench: give --rpc and --stock-rpc together (each build's servers), or neither")
    if a.threads < 1 or a.n_prompt < 1 or a.n_gen < 1 or a.repetitions < 1 or a.hosts < 1:
        raise SystemExit("rpc_bench: -t, -p, -n, -r and --hosts must be at least 1")
    if a.json and os.path.exists(a.json):
        raise SystemExit(f"rpc_bench: {a.json} exists; give a new path")
    for ep in endpoints(a.rpc):
        check_server(ep)  # ours' protocol: one line for a stock host or none
    for ep in endpoints(a.stock_rpc):
        if server_version(ep)[0] != STOCK_PROTOCOL_MAJOR:
            raise SystemExit(f"rpc_bench: {ep} does not speak stock's protocol {STOCK_PROTOCOL_MAJOR}: "
                             "run stock's ggml-rpc-server there")


@contextlib.contextmanager
def servers(a, tmp: str):
    """{side: [HOST:PORT, ...]}: the given hosts, or --hosts local servers of each build"""
    if a.rpc:
        yield {"ours": endpoints(a.rpc), "stock": endpoints(a.stock_rpc)}
        return
    with contextlib.ExitStack() as stack:
        eps = {side: [stack.enter_context(local_server(build.bin_path("patched" if side == "ours" else "stock",
                                                                      "ggml-rpc-server"),
                                                       a.threads, os.path.join(tmp, f"{side}-{i}.log")))
                      for i in range(a.hosts)]
               for side in SIDES}
        yield eps


def rpc_args(endpoints: list[str]) -> list[str]:
    """llama-bench's options for every layer on these hosts' devices: the hosts, and their devices
    alone (-dev: a GPU here would otherwise join them). RPC devices are named RPC0, RPC1, ... in
    the order of the hosts and of each host's devices."""
    n = sum(device_count(ep) for ep in endpoints)
    return ["-ngl", "99", "--rpc", ",".join(endpoints), "-dev", "/".join(f"RPC{i}" for i in range(n))]


def run(a, eps: dict[str, list[str]]) -> dict:
    """{side: {where: {"pp": [...], "tg": [...]}}}, the four runs interleaved round by round"""
    files = {"ours": a.model, "stock": a.stock}
    args = {(side, "rpc"): rpc_args(eps[side]) for side in SIDES} | {(side, "here"): ["-ngl", "0"] for side in SIDES}
    res = {s: {w: {"pp": [], "tg": []} for w in WHERE} for s in SIDES}
    for rep in range(a.repetitions):
        for where in WHERE:
            for side in SIDES:
                binary = str(build.bin_path("patched" if side == "ours" else "stock", "llama-bench"))
                pp, tg = llama_bench_once(binary, files[side], args[side, where], [a.n_prompt], a.n_gen, a.threads)
                if a.n_prompt not in pp or not tg:
                    raise RuntimeError(f"llama-bench of {side} ({where}) reported no pp{a.n_prompt} or tg{a.n_gen}")
                res[side][where]["pp"].append(pp[a.n_prompt])
                res[side][where]["tg"].append(tg)
        print(f"[round {rep + 1}/{a.repetitions} done]", flush=True)
    return res


def report(a, res: dict, n_layer: int, hops: int) -> str:
    med = {s: {w: {m: statistics.median(res[s][w][m]) for m in ("pp", "tg")} for w in WHERE} for s in SIDES}
    lines = [f"{os.path.basename(a.model)} against {os.path.basename(a.stock)}, {a.threads} threads, "
             f"pp{a.n_prompt} / tg{a.n_gen}, {a.repetitions} rounds (median t/s)", "",
             "| where | stock pp | ours pp | ours/stock | stock tg | ours tg | ours/stock |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in WHERE:
        s, o = med["stock"][w], med["ours"][w]
        lines.append(f"| {'here (-ngl 0)' if w == 'here' else 'over RPC (-ngl 99)'} | {s['pp']:.1f} | {o['pp']:.1f} | "
                     f"{o['pp'] / s['pp']:.2f}x | {s['tg']:.2f} | {o['tg']:.2f} | {o['tg'] / s['tg']:.2f}x |")
    lines.append("")
    for side in SIDES:
        per_token = 1 / med[side]["rpc"]["tg"] - 1 / med[side]["here"]["tg"]
        lines.append(f"{side}: RPC costs a decoded token {per_token * 1e3:.2f} ms: {per_token / hops * 1e3:.2f} ms a hand-off "
                     f"({hops} a token: here, then each host, then back), {per_token / n_layer * 1e6:.0f} us a layer "
                     f"({n_layer} layers)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="our file (pi-convert or pi-synth --pi)")
    ap.add_argument("--stock", required=True, help="its stock twin")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count(), help="threads, here and on local servers")
    ap.add_argument("-p", "--n-prompt", type=int, default=64, help="prompt tokens (pp)")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="decoded tokens (tg)")
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="rounds, the four runs interleaved")
    ap.add_argument("--hosts", type=int, default=2, help="local ggml-rpc-servers of each build (without --rpc)")
    ap.add_argument("--rpc", help="HOST:PORT,... of the patched build's servers, running elsewhere")
    ap.add_argument("--stock-rpc", help="HOST:PORT,... of stock's servers (with --rpc)")
    ap.add_argument("--json", help="write every run here (a new file)")
    a = ap.parse_args()
    try:
        check_args(a)
        with tempfile.TemporaryDirectory() as tmp, servers(a, tmp) as eps:
            res = run(a, eps)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # RpcError among them: one line each
        raise SystemExit(f"rpc_bench: {e}") from None
    print(report(a, res, ModelSizes.from_gguf(a.model).n_layer, len(eps["ours"]) + 1))
    if a.json:
        with open(a.json, "x") as f:
            json.dump({"model": a.model, "stock": a.stock, "threads": a.threads, "n_prompt": a.n_prompt,
                       "n_gen": a.n_gen, "endpoints": eps, "runs": res}, f, indent=1)


if __name__ == "__main__":
    main()
