"""pi-bench --serve: several streams served at once, ours against stock llama-server at one budget.

Each side is a llama-server of its own build: ours the patched one that pi-serve --parallel runs,
on our file with the budget as run-time keys; stock the unpatched one on the twin, in each of
stock's ways at that budget (stock.py). Every server has as many slots as the most streams asked.
For each stream count k, k clients at once each stream a completion of n_gen tokens (ignore_eos:
every stream runs to the end) after an n_prompt-token prompt of its own (no prompt cached from
another stream or round). Measured at the client: aggregate tokens/s from the first request sent
to the last token received, each stream's time to first token and ms per token after it.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class StreamStats:
    """One round of k streams at once."""

    streams: int
    wall_s: float        # first request sent -> last token received
    tokens: int          # generated, all streams together
    ttft_ms: float       # mean over streams
    ms_per_token: float  # mean over streams, after each one's first token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class ServeSide:
    name: str
    placement: str
    rounds: dict[int, list[StreamStats]] = field(default_factory=dict)

    def best(self, k: int) -> StreamStats:
        """The round of k streams with the highest aggregate rate (the least disturbed)."""
        return max(self.rounds[k], key=lambda s: s.tokens_per_s)


@dataclass
class ServeResult:
    model: str
    budget_bytes: int
    threads: int
    n_prompt: int
    n_gen: int
    streams: list[int]
    sides: dict[str, ServeSide]

    def stock_for(self, k: int) -> ServeSide | None:
        """Stock's way with the higher aggregate rate at k streams."""
        stock = [s for n, s in self.sides.items() if n.startswith("stock")]
        return max(stock, key=lambda s: s.best(k).tokens_per_s, default=None)

    def render(self) -> str:
        rows = [f"serving {Path(self.model).name}, budget {self.budget_bytes / 2**30:.2f} GiB, {self.threads} "
                f"threads: {self.n_prompt}-token prompts, {self.n_gen} tokens a stream",
                "", "| streams | side | aggregate t/s | ms/token a stream | TTFT ms | ours/stock |",
                "|---:|---|---:|---:|---:|---:|"]
        for k in self.streams:
            stock = self.stock_for(k)
            for side in [s for s in (self.sides.get("ours"), stock) if s is not None]:
                b = side.best(k)
                ratio = ""
                if side.name == "ours" and stock is not None:
                    ratio = f"{b.tokens_per_s / stock.best(k).tokens_per_s:.2f}x"
                rows.append(f"| {k} | {side.name} ({side.placement}) | {b.tokens_per_s:.2f} | {b.ms_per_token:.1f} "
                            f"| {b.ttft_ms:.0f} | {ratio} |")
        return "\n".join(rows)

    def to_json(self) -> dict:
        """The record, each round with its aggregate rate (render.write_json writes it)."""
        d = asdict(self)
        for name, side in self.sides.items():
            for k, rounds in side.rounds.items():
                for r, s in zip(d["sides"][name]["rounds"][k], rounds):
                    r["tokens_per_s"] = s.tokens_per_s
        return d


def prompt_tokens(n: int, seed: int, n_vocab: int) -> list[int]:
    """BOS and n - 1 ordinary token ids of a prompt no other stream or round shares."""
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(1000, min(n_vocab, 30000), size=n - 1)]


def one_stream(base: str, prompt: list[int], n_gen: int) -> tuple[float, float, float, int]:
    """A streamed completion: (sent, first token, last token) times and the tokens generated."""
    import httpx

    body = {"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices"):
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if tokens != n_gen:
        raise RuntimeError(f"a stream generated {tokens} tokens, not {n_gen}")
    return sent, first, last, tokens


def run_streams(base: str, k: int, n_prompt: int, n_gen: int, seed: int, n_vocab: int) -> StreamStats:
    """k streams at once, each with a prompt of its own."""
    with ThreadPoolExecutor(k) as ex:
        runs = list(ex.map(lambda i: one_stream(base, prompt_tokens(n_prompt, seed * 1000 + i, n_vocab), n_gen),
                           range(k)))
    start, end = min(r[0] for r in runs), max(r[2] for r in runs)
    return StreamStats(k, end - start, sum(r[3] for r in runs), 1e3 * float(np.mean([r[1] - r[0] for r in runs])),
                       1e3 * float(np.mean([(r[2] - r[1]) / max(1, r[3] - 1) for r in runs])))


def _measure_side(name: str, cmd_for_port, placement: str, streams: list[int], repetitions: int, n_prompt: int,
                  n_gen: int, n_vocab: int, progress) -> ServeSide:
    """One side's server started alone, warmed up, then every stream count, round after round."""
    from ..serve import ServerProcess, free_port

    port = free_port()
    server = ServerProcess(cmd_for_port(port), log=lambda m: None)
    side = ServeSide(name, placement)
    try:
        server.wait_ready()
        base = f"http://127.0.0.1:{port}"
        one_stream(base, prompt_tokens(n_prompt, 10 ** 6, n_vocab), min(n_gen, 8))  # warm-up
        for rep in range(repetitions):
            for k in streams:
                s = run_streams(base, k, n_prompt, n_gen, seed=rep * 100 + k, n_vocab=n_vocab)
                side.rounds.setdefault(k, []).append(s)
                progress(f"{name}: {k} streams, round {rep + 1}: {s.tokens_per_s:.2f} t/s, "
                         f"{s.ms_per_token:.1f} ms/token a stream")
    finally:
        server.stop()
    return side


def run_serve_bench(model: str, stock_model: str | None, budget: str | int, threads: int | None,
                    streams: list[int], n_prompt: int, n_gen: int, repetitions: int, progress=print) -> ServeResult:
    """Ours and stock's ways, one server at a time, at the same budget, every argument checked first."""
    from ..build import bin_path
    from ..serve import ours_placement, server_command
    from .runner import ModelPair, check_counts, planned_placement, resolve_budget
    from .stock import stock_sides

    check_counts(n_prompt, n_gen, repetitions, threads)
    if n_prompt < 1 or n_gen < 2:
        raise ValueError("--serve needs prompts of at least 1 token (-p) and at least 2 generated (-n)")
    if not streams or min(streams) < 1:
        raise ValueError("--serve takes stream counts of at least 1, e.g. 1,4,8")
    pair = ModelPair.read(model, stock_model)
    if not pair.ours:
        raise ValueError(f"{model} has no sparse layout: --serve compares our file with its --stock twin")
    budget_bytes = resolve_budget(budget, pair.ref.weight_bytes)
    threads = threads or os.cpu_count() or 1
    slots, n_ctx = max(streams), n_prompt + n_gen + 8
    n_vocab = pair.sizes.n_vocab
    # a budget the planner refuses (or no GPU) fails here, before any server starts
    where = planned_placement(pair.sizes, budget_bytes, n_ctx * slots).describe(pair.sizes.n_layer) \
        if budget_bytes else "CPU only"
    sides = {"ours": _measure_side(
        "ours", lambda port: server_command(str(bin_path("patched", "llama-server")), model, port, n_ctx, threads, slots,
                                            ours_placement(budget_bytes, True, n_ctx * slots)),
        f"sparse FFN, {where}", streams, repetitions, n_prompt, n_gen, n_vocab, progress)}
    if pair.stock_path is not None:
        stock_bin = str(bin_path("stock", "llama-server"))
        for name, s in stock_sides(pair.stock_sizes, pair.stock_path, stock_bin, budget_bytes, n_ctx * slots).items():
            sides[name] = _measure_side(
                name, lambda port, a=s.args: server_command(stock_bin, pair.stock_path, port, n_ctx, threads, slots, a),
                s.strategy, streams, repetitions, n_prompt, n_gen, n_vocab, progress)
    return ServeResult(model, budget_bytes, threads, n_prompt, n_gen, sorted(streams), sides)
