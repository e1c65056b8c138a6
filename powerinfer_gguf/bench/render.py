"""Renderings of a pi-bench result (llama-bench's printer per format): the table, the sweep
table, the plots and the JSON files, each written whole or not at all (outputs.staged)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..model_file import CPU_READ_GBPS, GPU_READ_GBPS, GiB
from ..outputs import staged
from .record import BenchResult


def render_table(res: BenchResult) -> str:
    """Markdown table, llama-bench style (mean +- sd over repetitions)."""
    lines = [f"model: {res.model} ({res.weight_bytes / GiB:.2f} GiB of weights), VRAM budget "
             f"{res.budget_bytes / GiB:.2f} GiB, {res.threads} threads, {res.repetitions} repetitions",
             "", "| side | placement | GPU GiB | pp{0} t/s | tg{1} t/s | GB read/token | GB/s |".format(
                 res.n_prompt, res.n_gen),
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in res.sides.values():
        d = s.summary()
        pp = f"{d['pp_tps']:.2f} ± {d['pp_sd']:.2f}" if s.pp_samples else "-"
        tg = f"{d['tg_tps']:.2f} ± {d['tg_sd']:.2f}" if s.tg_samples else "-"
        gbps = f"{d['decode_gbps']:.1f}" if s.tg_samples else "-"
        read = (f"{s.cpu_bytes / 1e9:.2f} CPU + {s.gpu_bytes_read / 1e9:.2f} GPU" if res.budget_bytes > 0
                else f"{s.decode_bytes / 1e9:.3f}")
        lines.append(f"| {s.name} | {s.strategy} | {s.gpu_bytes / GiB:.2f} | {pp} | {tg} | {read} | {gbps} |")
    j = res.to_json()
    if "stock_alt" in res.sides:
        lines.append(f"\nstock at this budget: the faster of -ngl and -ot, both run: {res.sides['stock'].strategy}")
    if "ratio_tg" in j:
        lines.append(f"\ndecode ratio ours/stock: {j['ratio_tg']:.2f}x")
    if "bound_tg" in j:
        kind = (f"two-sided bound (CPU {CPU_READ_GBPS:.0f} GB/s, GPU {GPU_READ_GBPS:.0f} GB/s)"
                if res.budget_bytes > 0 else "bytes-per-token bound")
        lines.append(f"{kind}: {j['bound_tg']:.2f}x; reached {100 * j['share_of_bound']:.0f}% of it")
    if "ratio_pp" in j:
        lines.append(f"prompt ratio ours/stock: {j['ratio_pp']:.2f}x")
    return "\n".join(lines)


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


def render_sweep_table(results: list[BenchResult]) -> str:
    r0 = results[0]
    lines = [f"model: {r0.model} ({r0.weight_bytes / GiB:.2f} GiB of weights), {r0.threads} threads, "
             f"tg{r0.n_gen}, {r0.repetitions} repetitions", "",
             "| budget | share of weights | stock (its best way) | stock t/s | ours placement | ours t/s | ratio | bound |",
             "|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in results:
        j = r.to_json()
        st, ours = r.sides.get("stock"), r.sides.get("ours")
        lines.append(f"| {r.budget_bytes / GiB:.2f} GiB | {100 * r.budget_bytes / r.weight_bytes:.0f}% | "
                     f"{st.strategy if st else '-'} | {st.tg_tps if st else 0:.2f} | "
                     f"{ours.strategy if ours else '-'} | {ours.tg_tps if ours else 0:.2f} | "
                     f"{j.get('ratio_tg', 0):.2f}x | {j.get('bound_tg', 0):.2f}x |")
    return "\n".join(lines)


def render_sweep_plot(results: list[BenchResult], path: str | os.PathLike) -> None:
    """Decode tokens/s against the VRAM budget, stock and ours, ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r.budget_bytes / r.weight_bytes for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("stock", "#888888"), ("ours", "#d62728")):
        ys = [r.sides[name].tg_tps if name in r.sides else float("nan") for r in results]
        ax.plot(x, ys, "o-", color=color, label=name)
    for r, xi in zip(results, x):
        j = r.to_json()
        if "ratio_tg" in j:
            ax.annotate(f"{j['ratio_tg']:.1f}x", (xi, r.sides["ours"].tg_tps), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("VRAM budget, % of the model's weights")
    ax.set_ylabel(f"decode tokens/s (tg{results[0].n_gen})")
    ax.set_title(f"{Path(results[0].model).name}: decode speed under a VRAM budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _write_whole(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


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
    """One BenchResult or DecodeProfile as JSON."""
    _write_json(res.to_json(), path)


def write_sweep_json(results: list[BenchResult], path: str | os.PathLike) -> None:
    _write_json([r.to_json() for r in results], path)
