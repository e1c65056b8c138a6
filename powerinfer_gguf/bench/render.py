"""Renderings of a pi-bench result (llama-bench's printer per format): the table, the sweep
table, the plots and the JSON files, each written whole or not at all (outputs.staged)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..model_file import CPU_READ_GBPS, GPU_READ_GBPS, GiB
from ..outputs import staged
from .record import BenchResult


TTFT_RULE = ("prompt tokens / prompt t/s at that size: the prompt run ends with the first token's logits; "
             "no decode step added")


def render_table(res: BenchResult) -> str:
    """Markdown table, llama-bench style (mean +- sd over repetitions), then the comparisons."""
    ttft = res.ttft_sizes
    lines = [f"model: {res.model} ({res.weight_bytes / GiB:.2f} GiB of weights), VRAM budget "
             f"{res.budget_bytes / GiB:.2f} GiB, {res.threads} threads, {res.repetitions} repetitions", "",
             f"| side | placement | GPU GiB | pp{res.n_prompt} t/s | tg{res.n_gen} t/s | "
             + "".join(f"TTFT {n} s | " for n in ttft) + "GB read/token | GB/s |",
             "|---|---|---:|---:|---:|" + "---:|" * len(ttft) + "---:|---:|"]
    lines += [_side_row(res, s) for s in res.sides.values()]
    return "\n".join(lines + [""] + _comparisons(res))


def _side_row(res: BenchResult, s) -> str:
    d = s.summary()
    pp = f"{d['pp_tps']:.2f} ± {d['pp_sd']:.2f}" if s.pp_samples else "-"
    tg = f"{d['tg_tps']:.2f} ± {d['tg_sd']:.2f}" if s.tg_samples else "-"
    ttft = "".join(f"{s.ttft_seconds(n):.3f} | " if s.samples(n) else "- | " for n in res.ttft_sizes)
    gbps = f"{d['decode_gbps']:.1f}" if s.tg_samples else "-"
    read = (f"{s.cpu_bytes / 1e9:.2f} CPU + {s.gpu_bytes_read / 1e9:.2f} GPU" if res.budget_bytes > 0
            else f"{s.decode_bytes / 1e9:.3f}")
    return f"| {s.name} | {s.strategy} | {s.gpu_bytes / GiB:.2f} | {pp} | {tg} | {ttft}{read} | {gbps} |"


def _comparisons(res: BenchResult) -> list[str]:
    """The lines under the table: stock's faster way per measure, the ratios against it, the bound,
    time to first token."""
    j, lines = res.to_json(), []
    if sum(name.startswith("stock") for name in res.sides) > 1:
        ways = [f"at {label}: {st.strategy}" for m, label in (("pp", f"prompts (pp{res.n_prompt})"),
                                                              ("tg", f"decode (tg{res.n_gen})"))
                if (st := res.stock_for(m))]
        lines.append("stock's faster way " + "; ".join(ways))
    if "ratio_tg" in j:
        lines.append(f"decode ratio ours/stock: {j['ratio_tg']:.2f}x")
    if "bound_tg" in j:
        kind = (f"two-sided bound (CPU {CPU_READ_GBPS:.0f} GB/s, GPU {GPU_READ_GBPS:.0f} GB/s)"
                if res.budget_bytes > 0 else "bytes-per-token bound")
        lines.append(f"{kind}: {j['bound_tg']:.2f}x; reached {100 * j['share_of_bound']:.0f}% of it")
    if "ratio_pp" in j:
        lines.append(f"prompt ratio ours/stock: {j['ratio_pp']:.2f}x")
    if res.ttft_sizes:
        lines.append(f"time to first token ({TTFT_RULE}; ratio: stock's time / ours'):")
        lines += [_ttft_line(res, n) for n in res.ttft_sizes]
    return lines


def _ttft_line(res: BenchResult, n: int) -> str:
    parts = []
    if (ours := res.sides.get("ours")) is not None:
        parts.append(f"ours {ours.ttft_seconds(n):.3f} s")
    if (st := res.stock_for(n)) is not None:
        parts.append(f"stock {st.ttft_seconds(n):.3f} s ({st.strategy})")
    ratio = res.ratio(n)
    return f"  {n} tokens: " + ", ".join(parts) + (f"; ratio {ratio:.2f}x" if ratio else "")


def render_plot(res: BenchResult, path: str | os.PathLike) -> None:
    """Paper-style bars: tokens/s per side, prompt and decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.sides)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in ((axes[0], "pp", f"prompt (pp{res.n_prompt})"),
                           (axes[1], "tg", f"decode (tg{res.n_gen})")):
        vals = [res.sides[n].summary()[f"{key}_tps"] for n in names]
        sds = [res.sides[n].summary()[f"{key}_sd"] for n in names]
        bars = ax.bar(names, vals, yerr=sds, capsize=4,
                      color=["#d62728" if n == "ours" else "#888888" for n in names])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{Path(res.model).name}, VRAM budget {res.budget_bytes / GiB:.1f} GiB, {res.threads} threads")
    fig.tight_layout()
    _write_whole(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


SWEEP_COLUMNS = ("budget", "share of weights", "stock at decode", "stock tg t/s", "ours placement", "ours tg t/s",
                 "tg ratio", "bound", "stock at prompts", "stock pp t/s", "ours pp t/s", "pp ratio")


def render_sweep_table(results: list[BenchResult]) -> str:
    """One row per budget: decode, then prompts, then time to first token; stock is its faster
    way at each measure (named per budget in the tables above it)."""
    r0 = results[0]
    ttft = sorted({n for r in results for n in r.ttft_sizes})
    head = [*SWEEP_COLUMNS, *(f"TTFT {n} s stock / ours" for n in ttft)]
    align = ["---:", "---:", "---", "---:", "---", "---:", "---:", "---:", "---", "---:", "---:", "---:"]
    lines = [f"model: {r0.model} ({r0.weight_bytes / GiB:.2f} GiB of weights), {r0.threads} threads, "
             f"tg{r0.n_gen}, pp{r0.n_prompt}, {r0.repetitions} repetitions", "",
             _row(head), _row(align + ["---:"] * len(ttft))]
    return "\n".join(lines + [_sweep_row(r, ttft) for r in results])


def _sweep_row(r: BenchResult, ttft: list[int]) -> str:
    j, ours = r.to_json(), r.sides.get("ours")
    st_tg, st_pp = r.stock_for("tg"), r.stock_for("pp")
    return _row([f"{r.budget_bytes / GiB:.2f} GiB", f"{100 * r.budget_bytes / r.weight_bytes:.0f}%",
                 _way(st_tg), _tps(st_tg, "tg"), _way(ours), _tps(ours, "tg"), _times(j.get("ratio_tg")),
                 _times(j.get("bound_tg")), _way(st_pp), _tps(st_pp, "pp"), _tps(ours, "pp"),
                 _times(j.get("ratio_pp")),
                 *(f"{_seconds(r.stock_for(n), n)} / {_seconds(ours, n)}" for n in ttft)])


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _way(side) -> str:
    return side.strategy if side else "-"


def _tps(side, measure) -> str:
    return f"{side.tps(measure):.2f}" if side and side.samples(measure) else "-"


def _seconds(side, n: int) -> str:
    return f"{side.ttft_seconds(n):.3f}" if side and side.samples(n) else "-"


def _times(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def render_sweep_plot(results: list[BenchResult], path: str | os.PathLike) -> None:
    """Tokens/s against the VRAM budget, decode and prompts side by side: ours and stock's faster
    way at each, ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = results[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, m, label in ((axes[0], "tg", f"decode (tg{r0.n_gen})"), (axes[1], "pp", f"prompt (pp{r0.n_prompt})")):
        _sweep_panel(ax, results, m)
        ax.set_ylabel(f"{label} tokens/s")
        ax.set_title(f"{label} under a VRAM budget")
    fig.suptitle(f"{Path(r0.model).name}, {r0.threads} threads")
    fig.tight_layout()
    _write_whole(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


def _sweep_panel(ax, results: list[BenchResult], measure: str) -> None:
    """One measure's t/s against the budget: stock's faster way at it and ours, ratios annotated."""
    x = [100 * r.budget_bytes / r.weight_bytes for r in results]
    lines = {"stock (its faster way)": ([r.stock_for(measure) for r in results], "#888888"),
             "ours": ([r.sides.get("ours") for r in results], "#d62728")}
    ax.set_xlabel("VRAM budget, % of the model's weights")
    if not any(s and s.samples(measure) for sides, _ in lines.values() for s in sides):
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        return
    for label, (sides, color) in lines.items():
        ax.plot(x, [s.tps(measure) if s and s.samples(measure) else float("nan") for s in sides],
                "o-", color=color, label=label)
    for r, xi in zip(results, x):
        if (ratio := r.ratio(measure)) is not None:
            ax.annotate(f"{ratio:.1f}x", (xi, r.sides["ours"].tps(measure)), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _write_whole(path: str | os.PathLike, write) -> None:
    """No half-written file: ``write(file)`` into a staged temporary beside ``path``, then moved in."""
    with staged() as st:
        tmp = st.file(Path(path))
        with open(tmp, "wb") as f:
            write(f)
        st.commit()


def _write_json(obj, path: str | os.PathLike) -> None:
    _write_whole(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_json(res, path: str | os.PathLike) -> None:
    """One BenchResult, DecodeProfile or ServeResult (--serve) as JSON."""
    _write_json(res.to_json(), path)


def write_sweep_json(results: list[BenchResult], path: str | os.PathLike) -> None:
    _write_json([r.to_json() for r in results], path)
