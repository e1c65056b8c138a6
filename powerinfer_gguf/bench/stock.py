"""Stock llama.cpp's ways to use a small GPU, planned from a GGUF's sizes: layer offload (-ngl)
and tensor overrides (-ot), with an estimate of the compute buffer each needs."""
from __future__ import annotations

from dataclasses import dataclass

from ..model_file import ModelSizes
from .record import SideResult


@dataclass
class Offload:
    """A stock layer-offload plan: -ngl and what it puts on the GPU."""

    ngl: int
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.compute_bytes


def compute_buffer_estimate(sizes: ModelSizes, n_ctx: int, n_ubatch: int, output_on_gpu: bool) -> int:
    """Rough size of llama.cpp's GPU compute buffers for one ubatch, reckoned as ours is
    (llama-powerinfer-placement.cpp, pi_compute_reserve): the largest part of the graph, as its
    allocator reuses memory from one part to the next (attention scores and softmax, the FFN's
    gate, up and h, the logits), f32, the residual stream alive throughout, plus 64 MiB of the
    backend's pool and workspace. An estimate that keeps the plan on the safe side of the budget."""
    attention = 2 * sizes.n_head * n_ctx + 4 * sizes.n_embd
    ffn = 3 * sizes.n_ff
    output = sizes.n_vocab + sizes.n_embd if output_on_gpu else 0
    return (64 << 20) + 4 * n_ubatch * (2 * sizes.n_embd + max(attention, ffn, output))


def stock_offload(sizes: ModelSizes, budget: int, n_ctx: int, n_ubatch: int = 512) -> Offload:
    """The largest -ngl whose weights + KV cache + compute buffer fit ``budget`` bytes.

    llama.cpp's order (src/llama-model.cpp load_tensors): -ngl 1 puts the output layer on the
    GPU, each further one the next repeating layer from the last; each offloaded layer keeps its
    KV cache on the GPU. The token embedding stays on the CPU. Budget 0 gives ngl 0."""
    best = Offload(0, 0, 0, 0)
    kv = sizes.kv_bytes_per_layer(n_ctx)
    for ngl in range(1, sizes.n_layer + 2):
        n_rep = ngl - 1
        w = sum(sizes.layer_bytes[sizes.n_layer - n_rep:]) + sizes.output_bytes
        # layers left on the CPU run large ubatches on the GPU, their weights copied over: one
        # layer's at a time (as ours counts its staging, llama-powerinfer-placement.cpp)
        staging = max(sizes.layer_bytes[:sizes.n_layer - n_rep], default=0)
        plan = Offload(ngl, w, kv * n_rep, staging + compute_buffer_estimate(sizes, n_ctx, min(n_ubatch, n_ctx), True))
        if plan.gpu_bytes > budget:
            break
        best = plan
    return best


@dataclass
class OverridePlan(Offload):
    """Stock's other way to use a small GPU (-ot): every layer's attention and KV cache and the
    output layer on the GPU (ngl = all), the FFN weights of the first ``ffn_cpu`` layers kept in
    CPU memory by tensor overrides (the rest on the GPU too)."""

    ffn_cpu: int = 0

    def args(self) -> list[str]:
        args = ["-ngl", str(self.ngl)]
        if self.ffn_cpu:
            layers = "|".join(str(i) for i in range(self.ffn_cpu))
            args += ["-ot", f"blk\\.({layers})\\.ffn_(gate|up|down)\\.weight=CPU"]
        return args


def stock_override(sizes: ModelSizes, budget: int, n_ctx: int, n_ubatch: int = 512) -> "OverridePlan | None":
    """The -ot plan that keeps the fewest FFN layers on the CPU within ``budget``; None when
    attention, KV and output alone do not fit."""
    kv = sizes.kv_bytes_per_layer(n_ctx) * sizes.n_layer
    attn = sum(b - f for b, f in zip(sizes.layer_bytes, sizes.ffn_bytes)) + sizes.output_bytes
    comp = compute_buffer_estimate(sizes, n_ctx, min(n_ubatch, n_ctx), True)
    for m in range(sizes.n_layer + 1):
        staging = max(sizes.ffn_bytes[:m], default=0)  # a CPU layer's FFN copied for a large ubatch
        plan = OverridePlan(sizes.n_layer + 1, attn + sum(sizes.ffn_bytes[m:]), kv, comp + staging, ffn_cpu=m)
        if plan.gpu_bytes <= budget:
            return plan
    return None


def stock_sides(sizes: ModelSizes, path: str, binary: str, budget: int, n_ctx: int) -> dict[str, SideResult]:
    """Stock's two ways at this budget, each a side to run: "stock" (-ngl) and, under a budget
    where it fits and differs, "stock_ot" (-ot). Both load the weights into memory (-lm none, no
    mmap): faster for both sides on the CPU (stock 3B here 3.23 vs 2.95 t/s mmapped), and ours
    needs it for 2 MB pages (ggml_pi_advise_hugepages)."""
    L = sizes.n_layer
    plan = stock_offload(sizes, budget, n_ctx)
    n_rep = max(0, plan.ngl - 1)
    c, g = sizes.stock_split_bytes(set(range(L - n_rep, L)), set(), plan.ngl > 0)
    sides = {"stock": SideResult("stock", binary, path, ["-ngl", str(plan.ngl), "-lm", "none"],
                                 f"-ngl {plan.ngl}/{L + 1}", plan.gpu_bytes, sizes.decode_bytes_dense(),
                                 cpu_bytes=c, gpu_bytes_read=g)}
    ot = stock_override(sizes, budget, n_ctx) if budget > 0 else None
    if ot is not None and plan.ngl <= L:  # (at ngl L+1 everything is on the GPU already)
        c, g = sizes.stock_split_bytes(set(range(L)), set(range(ot.ffn_cpu)), True)
        sides["stock_ot"] = SideResult(
            "stock_ot", binary, path, ot.args() + ["-lm", "none"],
            f"-ot: attention+KV+output on GPU, FFN of {ot.ffn_cpu}/{L} layers on CPU", ot.gpu_bytes,
            sizes.decode_bytes_dense(), cpu_bytes=c, gpu_bytes_read=g)
    return sides
