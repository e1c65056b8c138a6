"""pi-bench: prompt and decode speed, ours against stock llama.cpp, side by side, at one VRAM budget.

One run measures into one :class:`BenchResult` (record.py); the table, ``--json`` and ``--plot``
are renderings of it (render.py). Each side is timed by llama-bench from its own build (stock:
unpatched; ours: patched), one repetition per invocation, the sides interleaved round by round
(runner.py). Stock's ways to use a small GPU are planned from the GGUF's sizes (stock.py); each
measure (prompts, decode, time to first token) compares ours with the way faster at it (record.py);
profile.py runs ours through the Python API instead. What a model file holds and costs, and the
budgets, are model_file's.
"""
from ..model_file import GiB, ModelSizes, SparseProfile, parse_size
from .profile import DecodeProfile, SparseQuality, profile_decode, sparse_quality
from .record import BenchResult, Placement, SideResult, faster_stock, load_results
from .render import (render_plot, render_sweep_plot, render_sweep_table, render_table,
                     write_json, write_sweep_json)
from .runner import llama_bench_once, parse_ttft, planned_placement, run_bench, run_sweep
from .stock import Offload, OverridePlan, compute_buffer_estimate, stock_offload, stock_override

__all__ = ["BenchResult", "DecodeProfile", "GiB", "ModelSizes", "Offload", "OverridePlan", "Placement",
           "SideResult", "SparseProfile", "SparseQuality", "compute_buffer_estimate", "faster_stock",
           "llama_bench_once", "load_results", "parse_ttft", "planned_placement", "parse_size", "profile_decode",
           "render_plot", "render_sweep_plot", "render_sweep_table", "render_table", "run_bench",
           "run_sweep", "sparse_quality", "stock_offload", "stock_override", "write_json",
           "write_sweep_json"]
