"""The one result record of a pi-bench run (llama-bench's idea): every rendering (table, JSON,
plot) reads a BenchResult; load_results reads one back from its JSON."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model_file import GiB, two_sided_seconds


@dataclass
class SideResult:
    name: str                      # "stock" or "ours"
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
                **({"placement": asdict(self.placement)} if self.placement else {})}


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

    def to_json(self) -> dict:
        d = {"model": self.model, "budget_bytes": self.budget_bytes, "threads": self.threads,
             "n_prompt": self.n_prompt, "n_gen": self.n_gen, "repetitions": self.repetitions,
             "weight_bytes": self.weight_bytes}
        for name, side in self.sides.items():
            d[name] = side.summary()
        if "stock" in self.sides and "ours" in self.sides and self.sides["stock"].tg_tps:
            d["ratio_tg"] = self.sides["ours"].tg_tps / self.sides["stock"].tg_tps
            if self.sides["stock"].pp_tps:
                d["ratio_pp"] = self.sides["ours"].pp_tps / self.sides["stock"].pp_tps
            st, ours = self.sides["stock"], self.sides["ours"]
            if self.budget_bytes > 0 and ours.cpu_bytes + ours.gpu_bytes_read:
                # two-sided bound: bytes from CPU memory at CPU_READ_GBPS plus bytes from VRAM at
                # GPU_READ_GBPS, per token, stock's over ours
                d["bound_tg"] = (two_sided_seconds(st.cpu_bytes, st.gpu_bytes_read)
                                 / two_sided_seconds(ours.cpu_bytes, ours.gpu_bytes_read))
                d["share_of_bound"] = d["ratio_tg"] / d["bound_tg"]
            elif ours.decode_bytes:
                # bytes-per-token bound: the ratio if both sides read weights at the same speed
                d["bound_tg"] = st.decode_bytes / ours.decode_bytes
                d["share_of_bound"] = d["ratio_tg"] / d["bound_tg"]
        return d


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
        sides = {}
        for name in ("stock", "stock_alt", "ours"):
            if name not in d:
                continue
            x = d[name]
            pl = x.get("placement")
            sides[name] = SideResult(name, x["binary"], x["model"], x["args"], x["strategy"], x["gpu_bytes"],
                                     x.get("decode_bytes", 0), x.get("cpu_bytes_per_token", 0),
                                     x.get("gpu_bytes_per_token", 0), Placement(**pl) if pl else None,
                                     list(x["pp_samples"]), list(x["tg_samples"]))
        out.append(BenchResult(d["model"], d["budget_bytes"], d["threads"], d["n_prompt"], d["n_gen"],
                               d["repetitions"], d["weight_bytes"], sides))
    return out
