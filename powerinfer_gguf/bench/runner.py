"""Running llama-bench: one repetition per invocation, the sides interleaved round by round so
that machine noise hits both alike; every argument checked before the first run."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..format import Keys
from ..model_file import GiB, ModelSizes, check_gguf, parse_size
from .record import BenchResult, Placement, SideResult
from .stock import stock_sides


@dataclass
class ModelPair:
    """What one pi-bench run compares: our file (sparse layout) and/or a stock GGUF."""

    sizes: ModelSizes                  # the file given first
    ours: bool                         # it has our sparse layout
    stock_path: str | None             # the file stock runs on (the twin, or the plain file itself)
    stock_sizes: ModelSizes | None

    @property
    def ref(self) -> ModelSizes:
        """The weights a percentage budget is a share of (stock's, where there is a stock side)."""
        return self.stock_sizes or self.sizes

    @classmethod
    def read(cls, model: str, stock_model: str | None) -> "ModelPair":
        for path in (model, stock_model):
            if path is not None:
                check_gguf(path)
        sizes = ModelSizes.from_gguf(model)
        ours = sizes.sparse is not None
        if not ours and stock_model is not None:
            raise ValueError(f"{model} has no sparse layout (not a pi-convert output): give it alone "
                             "for a stock-only run, or give our file with --stock TWIN")
        stock_path = stock_model if ours else model
        stock_sizes = ModelSizes.from_gguf(stock_path) if stock_path else None
        if stock_sizes is not None and ours and _shape(stock_sizes) != _shape(sizes):
            raise ValueError(f"{stock_path} is not the same shape as {model}: not its stock twin")
        return cls(sizes, ours, stock_path, stock_sizes)


def _shape(s: ModelSizes) -> tuple[int, int, int]:
    return s.n_layer, s.n_embd, s.n_ff


def resolve_budget(budget: str | int, weight_bytes: int) -> int:
    """Bytes of a budget ("0", "40%" of weight_bytes, "8GiB", "auto"), refused when negative."""
    budget_bytes = parse_size(budget, weight_bytes)
    if budget_bytes < 0:
        raise ValueError("the VRAM budget cannot be negative")
    return budget_bytes


def check_counts(n_prompt: int, n_gen: int, repetitions: int, threads: int | None) -> None:
    if threads is not None and threads < 0:
        raise ValueError(f"-t {threads}: give a number of threads (0 or none: all cores)")
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise ValueError("need -p and/or -n above 0")
    if repetitions < 1:
        raise ValueError("need at least one repetition")


DEFAULT_TTFT = (512, 2048)


def parse_ttft(text: str | None) -> list[int] | None:
    """--ttft's prompt sizes: "512,2048" (tokens), "none"; None (not given) leaves the default to
    the budget (ttft_sizes)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        sizes = sorted({int(x) for x in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--ttft {text!r}: give prompt sizes in tokens above 0, comma-separated "
                         "(e.g. 512,2048), or none")
    return sizes


def ttft_sizes(ttft: list[int] | None, budget_bytes: int) -> list[int]:
    """The prompt sizes to time the first token at: as given, else 512 and 2048 when a budget
    above 0 puts a GPU to work (on a CPU alone a 13B model's 2048-token prompt takes minutes per
    run), else none."""
    if ttft is not None:
        return ttft
    return list(DEFAULT_TTFT) if budget_bytes > 0 else []


def planned_placement(sizes: ModelSizes, budget_bytes: int, n_ctx: int) -> Placement:
    """Our planner's decision for this file and budget, through the C API (llama.cpp plans the
    file without loading it): layers on the GPU, hot rows per layer, their bytes and mass. A budget
    llama.cpp refuses fails here, in one line, before any run."""
    from ..runtime import plan_file

    layers = plan_file(sizes.path, budget_bytes, n_ctx)
    rows = [p.gpu_rows for p in layers]
    on_gpu = [p.attn_gpu for p in layers]
    base = sizes.output_bytes + sum(sizes.layer_bytes[i] - sizes.ffn_bytes[i] + sizes.kv_bytes_per_layer(n_ctx)
                                    for i in range(sizes.n_layer) if on_gpu[i])
    hot = sum(rows[i] * sizes.ffn_bytes[i] / sizes.n_ff for i in range(sizes.n_layer))  # gate + up + down_t rows
    mass_all = sum(float(np.sum(sizes.freqs[i])) for i in range(sizes.n_layer) if on_gpu[i])
    mass_gpu = sum(float(np.sum(sizes.freqs[i][:rows[i]])) for i in range(sizes.n_layer) if on_gpu[i])
    # the output layer is the planner's first offload: any budget it accepts holds it
    return Placement(sum(on_gpu), True, base / GiB, hot / GiB, 100.0 * mass_gpu / mass_all if mass_all else 0.0, rows)


def llama_bench_once(binary: str, model: str, args: list[str], prompts: list[int], n_gen: int,
                     threads: int, log: list[str] | None = None) -> tuple[dict[int, float], float | None]:
    """One repetition of llama-bench (its own warm-up included) at each prompt size and at
    decode; returns ({prompt size: pp t/s}, tg t/s). ``log`` gets llama.cpp's log lines (stderr)."""
    cmd = [binary, "-m", model, "-t", str(threads), "-p", ",".join(map(str, prompts or [0])),
           "-n", str(n_gen), "-r", "1", "-o", "json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log[:] = r.stderr.splitlines()
    if r.returncode != 0:
        for line in r.stderr.splitlines():
            if "powerinfer:" in line and ("budget" in line or "vram" in line.lower()):
                raise RuntimeError(f"{Path(binary).name} failed on {model}: {line.split('powerinfer:', 1)[1].strip()}")
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{Path(binary).name} failed on {model}: {last}")
    try:
        records = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{Path(binary).name}: unreadable JSON output") from None
    pp, tg = {}, None
    for rec in records:
        if rec.get("n_prompt", 0) > 0 and rec.get("n_gen", 0) == 0:
            pp[int(rec["n_prompt"])] = float(rec["avg_ts"])
        elif rec.get("n_gen", 0) > 0 and rec.get("n_prompt", 0) == 0:
            tg = float(rec["avg_ts"])
    return pp, tg


@dataclass
class Runs:
    """What each side is timed at, each round: -p, -n, the TTFT prompt sizes; and how often, on
    how many threads."""

    n_prompt: int
    n_gen: int
    ttft: list[int]
    repetitions: int
    threads: int

    @property
    def prompts(self) -> list[int]:
        """llama-bench's -p list: -p itself and the TTFT sizes, each once."""
        return sorted({self.n_prompt, *self.ttft} - {0})

    @property
    def n_ctx(self) -> int:
        """The longest context a run needs: the plans on both sides keep its KV cache."""
        return max([self.n_prompt + self.n_gen, *self.ttft])


def run_bench(model: str, stock_model: str | None = None, budget: str | int = 0,
              threads: int | None = None, n_prompt: int = 64, n_gen: int = 128,
              repetitions: int = 3, ttft: list[int] | None = None, progress=print) -> BenchResult:
    """Both sides at one budget: ours (patched llama-bench on our sparse file) and stock
    (unpatched llama-bench on the stock twin, or on ``model`` itself when it is a plain GGUF),
    one repetition per invocation, interleaved round by round. ``ttft``: prompt sizes to time
    the first token at (None: ttft_sizes' default)."""
    check_counts(n_prompt, n_gen, repetitions, threads)
    pair = ModelPair.read(model, stock_model)
    budget_bytes = resolve_budget(budget, pair.ref.weight_bytes)
    runs = Runs(n_prompt, n_gen, ttft_sizes(ttft, budget_bytes), repetitions, threads or os.cpu_count() or 1)
    return _run_pair(pair, budget_bytes, runs, progress)


def run_sweep(model: str, stock_model: str | None, budgets: list[str], threads: int | None = None,
              n_prompt: int = 64, n_gen: int = 128, repetitions: int = 3, ttft: list[int] | None = None,
              progress=print) -> list[BenchResult]:
    """run_bench at each budget in turn ("0", "10%", "8GiB", ...), every budget read first."""
    if not budgets:
        raise ValueError("--sweep needs at least one budget")
    check_counts(n_prompt, n_gen, repetitions, threads)
    pair = ModelPair.read(model, stock_model)
    resolved = [resolve_budget(b, pair.ref.weight_bytes) for b in budgets]
    threads = threads or os.cpu_count() or 1
    return [_run_pair(pair, b, Runs(n_prompt, n_gen, ttft_sizes(ttft, b), repetitions, threads), progress)
            for b in resolved]


def _run_pair(pair: ModelPair, budget_bytes: int, runs: Runs, progress) -> BenchResult:
    from ..build import bin_path

    sides: dict[str, SideResult] = {}
    if pair.stock_sizes is not None:
        sides.update(stock_sides(pair.stock_sizes, pair.stock_path, str(bin_path("stock", "llama-bench")),
                                 budget_bytes, runs.n_ctx))
    if pair.ours:
        sides["ours"] = _ours_side(pair.sizes, str(bin_path("patched", "llama-bench")), budget_bytes, runs.n_ctx)
    for rep in range(runs.repetitions):
        _run_round(sides, rep, runs, progress)
    return BenchResult(pair.sizes.path, budget_bytes, runs.threads, runs.n_prompt, runs.n_gen, runs.repetitions,
                       pair.ref.weight_bytes, sides)


def _ours_side(sizes: ModelSizes, binary: str, budget_bytes: int, n_ctx: int) -> SideResult:
    args, strategy = ["-ngl", "0", "-lm", "none"], "sparse FFN, CPU"
    if budget_bytes > 0:
        args = ["-ngl", "99", "-lm", "none",
                "--override-kv", f"{Keys.Runtime.VRAM_BUDGET}=int:{budget_bytes}",
                "--override-kv", f"{Keys.Runtime.VRAM_CTX}=int:{n_ctx}"]
        strategy = "planned at load"
    c = sizes.decode_bytes_sparse()
    side = SideResult("ours", binary, sizes.path, args, strategy, 0, c, cpu_bytes=c, gpu_bytes_read=0)
    if budget_bytes > 0:
        _take_placement(side, sizes, planned_placement(sizes, budget_bytes, n_ctx))
    return side


def _run_round(sides: dict[str, SideResult], rep: int, runs: Runs, progress) -> None:
    # ours first: a budget llama.cpp refuses fails the run before stock has spent its time
    for side in sorted(sides.values(), key=lambda x: x.name != "ours"):
        pp, tg = llama_bench_once(side.binary, side.model, side.args, runs.prompts, runs.n_gen, runs.threads)
        if runs.n_prompt in pp:
            side.pp_samples.append(pp[runs.n_prompt])
        for n in runs.ttft:
            side.ttft_samples.setdefault(n, []).append(pp[n])
        if tg is not None:
            side.tg_samples.append(tg)
        progress(f"[{rep + 1}/{runs.repetitions}] {side.name}: "
                 + "".join(f"pp{n} {v:.2f} t/s  " for n, v in sorted(pp.items()))
                 + (f"tg{runs.n_gen} {tg:.2f} t/s" if tg else ""))


def _take_placement(side: SideResult, sizes: ModelSizes, pl: Placement) -> None:
    """Ours under a budget: what the planner put where, and the bytes a token reads on each side."""
    side.placement = pl
    side.strategy = pl.describe(sizes.n_layer)
    side.gpu_bytes = pl.gpu_bytes
    side.cpu_bytes, side.gpu_bytes_read = sizes.split_decode_bytes(
        pl.gpu_rows, [i >= sizes.n_layer - pl.layers for i in range(sizes.n_layer)], pl.output)
    side.decode_bytes = side.cpu_bytes + side.gpu_bytes_read

