"""The one result record of a pi-bench run (llama-bench's idea): every rendering (table, JSON,
plot) reads a BenchResult; load_results reads one back from its JSON.

A *measure* is what a side is timed at: "pp" (prompts of -p tokens), "tg" (decode) or an int, the
prompt size a time to first token (TTFT) is taken at. Stock may run two ways at one budget; each
measure compares ours with the way faster at that measure (faster_stock)."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model_file import GiB, two_sided_seconds


@dataclass
class SideResult:
    name: str                      # "stock" (-ngl), "stock_ot" (-ot) or "ours"
    binary: str
    model: str
    args: list[str]
    strategy: str                  # e.g. "-ngl 12"
    gpu_bytes: int
    decode_bytes: int = 0          # weight bytes one decoded token reads (expected)
    cpu_bytes: int = 0             # ... of which from CPU memory
    gpu_bytes_read: int = 0        # ... and from GPU memory
    placement: "Placement | None" = None  # ours under a budget: the planner's decision
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)
    ttft_samples: dict[int, list[float]] = field(default_factory=dict)  # prompt t/s per TTFT prompt size

    @staticmethod
    def _mean_sd(xs: list[float]) -> tuple[float, float]:
        if not xs:
            return 0.0, 0.0
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    @property
    def pp_tps(self) -> float:
        return self._mean_sd(self.pp_samples)[0]

    @property
    def tg_tps(self) -> float:
        return self._mean_sd(self.tg_samples)[0]

    def samples(self, measure: "str | int") -> list[float]:
        """t/s samples of one measure: "pp", "tg", or a TTFT prompt size."""
        if measure == "pp":
            return self.pp_samples
        if measure == "tg":
            return self.tg_samples
        return self.ttft_samples.get(measure, [])

    def tps(self, measure: "str | int") -> float:
        return self._mean_sd(self.samples(measure))[0]

    def ttft_seconds(self, n_prompt: int) -> float:
        """Time to first token for a prompt of n_prompt tokens: n_prompt / prompt t/s (llama-bench's
        prompt run ends with the last token's logits, from which the first token is sampled)."""
        tps = self.tps(n_prompt)
        return n_prompt / tps if tps else 0.0

    def ttft_summary(self) -> dict:
        out = {}
        for n, xs in sorted(self.ttft_samples.items()):
            tps, sd = self._mean_sd(xs)
            out[str(n)] = {"seconds": self.ttft_seconds(n), "pp_tps": tps, "pp_sd": sd, "pp_samples": xs}
        return out

    def summary(self) -> dict:
        pp, pp_sd = self._mean_sd(self.pp_samples)
        tg, tg_sd = self._mean_sd(self.tg_samples)
        return {"pp_tps": pp, "pp_sd": pp_sd, "tg_tps": tg, "tg_sd": tg_sd,
                "pp_samples": self.pp_samples, "tg_samples": self.tg_samples,
                "strategy": self.strategy, "gpu_bytes": self.gpu_bytes, "binary": self.binary,
                "model": self.model, "args": self.args, "decode_bytes": self.decode_bytes,
                "decode_gbps": tg * self.decode_bytes / 1e9, "cpu_bytes_per_token": self.cpu_bytes,
                "gpu_bytes_per_token": self.gpu_bytes_read,
                "bound_seconds_per_token": two_sided_seconds(self.cpu_bytes, self.gpu_bytes_read),
                **({"ttft": self.ttft_summary()} if self.ttft_samples else {}),
                **({"placement": asdict(self.placement)} if self.placement else {})}


def faster_stock(sides: dict[str, SideResult], measure: "str | int") -> SideResult | None:
    """Of stock's ways run at one budget, the one with the most t/s at ``measure``; None when
    stock has none measured. (Older JSON calls the way faster at decode "stock", the other
    "stock_alt": both are stock's ways all the same.)"""
    ways = [s for name, s in sides.items() if name.startswith("stock") and s.samples(measure)]
    return max(ways, key=lambda s: s.tps(measure), default=None)


@dataclass
class BenchResult:
    model: str
    budget_bytes: int
    threads: int
    n_prompt: int
    n_gen: int
    repetitions: int
    weight_bytes: int
    sides: dict[str, SideResult]

    @property
    def ttft_sizes(self) -> list[int]:
        """The prompt sizes a time to first token was measured at."""
        return sorted({n for s in self.sides.values() for n in s.ttft_samples})

    def stock_for(self, measure: "str | int") -> SideResult | None:
        """Stock's way that ours is compared with at ``measure``: the faster one at it."""
        return faster_stock(self.sides, measure)

    def ratio(self, measure: "str | int") -> float | None:
        """Ours' t/s over stock's faster way's at one measure (at a TTFT prompt size: stock's time
        to first token over ours'); None without both."""
        ours, st = self.sides.get("ours"), self.stock_for(measure)
        if ours is None or st is None or not ours.samples(measure):
            return None
        return ours.tps(measure) / st.tps(measure)

    def to_json(self) -> dict:
        d = {"model": self.model, "budget_bytes": self.budget_bytes, "threads": self.threads,
             "n_prompt": self.n_prompt, "n_gen": self.n_gen, "repetitions": self.repetitions,
             "weight_bytes": self.weight_bytes}
        for name, side in self.sides.items():
            d[name] = side.summary()
        measures = ["pp", "tg", *self.ttft_sizes]
        d["stock_way"] = {str(m): st.name for m in measures if (st := self.stock_for(m))}
        for m in ("tg", "pp"):
            if (r := self.ratio(m)) is not None:
                d[f"ratio_{m}"] = r
        if ttft := {str(n): r for n in self.ttft_sizes if (r := self.ratio(n)) is not None}:
            d["ratio_ttft"] = ttft
        if "ratio_tg" in d:
            d.update(self._bound())
        return d

    def _bound(self) -> dict:
        """The decode ratio's bound and the share of it reached, against stock's way faster at decode."""
        st, ours, ratio = self.stock_for("tg"), self.sides["ours"], self.ratio("tg")
        if self.budget_bytes > 0 and ours.cpu_bytes + ours.gpu_bytes_read:
            # two-sided bound: bytes from CPU memory at CPU_READ_GBPS plus bytes from VRAM at
            # GPU_READ_GBPS, per token, stock's over ours
            bound = (two_sided_seconds(st.cpu_bytes, st.gpu_bytes_read)
                     / two_sided_seconds(ours.cpu_bytes, ours.gpu_bytes_read))
        elif ours.decode_bytes:
            # bytes-per-token bound: the ratio if both sides read weights at the same speed
            bound = st.decode_bytes / ours.decode_bytes
        else:
            return {}
        return {"bound_tg": bound, "share_of_bound": ratio / bound}


@dataclass
class Placement:
    """Our planner's decision (bench.runner.planned_placement, through the C API)."""

    layers: int            # layers whose attention, predictor and KV are on the GPU (the last ones)
    output: bool           # output layer on the GPU
    base_gib: float        # those weights + KV
    rows_gib: float        # hot FFN rows on the GPU
    mass: float            # share of the offloaded layers' activation mass in those rows
    gpu_rows: list[int]    # per layer: FFN rows in GPU memory

    @property
    def gpu_bytes(self) -> int:
        return int((self.base_gib + self.rows_gib) * GiB)

    def describe(self, n_layer: int) -> str:
        return (f"{self.layers}/{n_layer} layers{' + output' if self.output else ''} on GPU, "
                f"hot rows {self.rows_gib:.2f} GiB ({self.mass:.0f}% of mass)")


def load_results(path: str | os.PathLike) -> list[BenchResult]:
    """BenchResults back from write_json / write_sweep_json output (to re-render a table or plot
    of a run made elsewhere, e.g. on the GPU machine)."""
    data = json.loads(Path(path).read_text())
    out = []
    for d in data if isinstance(data, list) else [data]:
        sides = {name: _side_from_json(name, d[name]) for name in SIDE_NAMES if name in d}
        out.append(BenchResult(d["model"], d["budget_bytes"], d["threads"], d["n_prompt"], d["n_gen"],
                               d["repetitions"], d["weight_bytes"], sides))
    return out


SIDE_NAMES = ("stock", "stock_ot", "stock_alt", "ours")  # stock_alt: JSON written before issue 15


def _side_from_json(name: str, x: dict) -> SideResult:
    pl = x.get("placement")
    ttft = {int(n): list(t["pp_samples"]) for n, t in x.get("ttft", {}).items()}
    return SideResult(name, x["binary"], x["model"], x["args"], x["strategy"], x["gpu_bytes"],
                      x.get("decode_bytes", 0), x.get("cpu_bytes_per_token", 0),
                      x.get("gpu_bytes_per_token", 0), Placement(**pl) if pl else None,
                      list(x["pp_samples"]), list(x["tg_samples"]), ttft)
