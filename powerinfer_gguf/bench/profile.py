"""Ours through the Python API, not llama-bench: where a decoded token's time goes
(profile_decode: the CPU sparse FFN kernel's own clock against the rest) and how close sparse
decoding stays to dense on the same file (sparse_quality)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..model_file import GiB, check_gguf


@dataclass
class SparseQuality:
    n_tokens: int
    free_match: float         # greedy texts generated independently: share of positions equal
    first_difference: int     # first position where they differ (n_tokens if none)
    forced_match: float       # sparse's greedy choice along the dense text: share equal to dense's
    logit_rel_err: float      # max |sparse - dense| / max |dense| over the dense text's logits
    computed_share: float     # FFN rows the sparse engine computed per token (mean over layers)

    def line(self) -> str:
        return (f"{self.n_tokens} greedy tokens: free-running texts equal at {self.free_match:.1%} of positions "
                f"(first difference at {self.first_difference}); along the dense text sparse picks the same "
                f"token {self.forced_match:.1%} of the time, max |dlogit|/max|logit| {self.logit_rel_err:.2e}; "
                f"rows computed {self.computed_share:.3f}")


def _last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token, copied out of the context."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def sparse_quality(path: str, prompt: str = "The history of the language", n_tokens: int = 128,
                   n_threads: int | None = None, **kw) -> SparseQuality:
    """Greedy decoding of one file, sparse (its predictors) against dense (every neuron)."""
    from .. import Llama

    def open_(sparse: bool):
        return Llama(str(path), sparse=sparse, n_ctx=n_tokens + 64, n_threads=n_threads or os.cpu_count(),
                     verbose=False, **kw)

    dense, sparse = open_(False), open_(True)
    try:
        prompt_toks = dense.tokenize(prompt.encode())
        texts = [_greedy(llm, prompt_toks, n_tokens) for llm in (dense, sparse)]
        same = np.array(texts[0]) == np.array(texts[1])
        first = int(np.argmin(same)) if not same.all() else n_tokens
        sparse.reset_sparse_stats()
        agree, rel_err = _forced(dense, sparse, prompt_toks, texts[0])
        share = float(np.mean([s.computed_share for s in sparse.sparse_stats()]))
    finally:
        dense.close()
        sparse.close()
    return SparseQuality(n_tokens, float(same.mean()), first, agree / n_tokens, rel_err, share)


def _greedy(llm, prompt_toks: list[int], n_tokens: int) -> list[int]:
    """The greedy continuation of the prompt, free-running."""
    llm.reset()
    llm.eval(prompt_toks)
    out = []
    for _ in range(n_tokens):
        out.append(int(_last_logits(llm).argmax()))
        llm.eval([out[-1]])
    return out


def _forced(dense, sparse, prompt_toks: list[int], text: list[int]) -> tuple[int, float]:
    """Both fed the same text: (positions where their greedy picks agree, max |dlogit| / max
    |logit| of dense)."""
    for llm in (dense, sparse):
        llm.reset()
        llm.eval(prompt_toks)
    agree, err, top = 0, 0.0, 0.0
    for t in text:
        ld, ls = _last_logits(dense), _last_logits(sparse)
        agree += int(ld.argmax() == ls.argmax())
        err, top = max(err, float(np.abs(ld - ls).max())), max(top, float(np.abs(ld).max()))
        dense.eval([t])
        sparse.eval([t])
    return agree, err / max(top, 1e-30)


@dataclass
class DecodeProfile:
    """Ours through the Python API, one token per decode: the token's wall time, and the part of
    it the CPU sparse FFN kernel took (its own clock) with the bytes it read."""

    model: str
    budget_bytes: int
    threads: int
    n_tokens: int
    token_ms: float          # wall time per decoded token (llama_decode + greedy pick)
    layers: list = field(default_factory=list)      # LayerStats per layer, over the n_tokens
    placement: list = field(default_factory=list)   # LayerPlacement per layer

    @property
    def cpu_ffn_ms(self) -> float:
        """Of a token's time, inside the CPU sparse FFN kernel, all layers."""
        return sum(s.cpu_ns for s in self.layers) / 1e6 / self.n_tokens

    @property
    def cpu_ffn_bytes(self) -> float:
        """Bytes of FFN rows the CPU kernel read per token."""
        return sum(s.cpu_bytes for s in self.layers) / self.n_tokens

    @property
    def cpu_threads(self) -> int:
        """Threads that kernel ran with (0: it never ran)."""
        return max((s.cpu_threads for s in self.layers), default=0)

    @property
    def rest_ms(self) -> float:
        """Everything but the CPU FFN: attention, predictors, output, GPU work, hand-offs."""
        return self.token_ms - self.cpu_ffn_ms

    @property
    def cpu_gbps(self) -> float:
        return self.cpu_ffn_bytes / (self.cpu_ffn_ms * 1e6) if self.cpu_ffn_ms else 0.0

    def render(self) -> str:
        n_cpu = sum(1 for s in self.layers if s.cpu_threads)
        lines = [f"profile: {self.model}, VRAM budget {self.budget_bytes / GiB:.2f} GiB, {self.threads} threads, "
                 f"{self.n_tokens} decoded tokens",
                 f"per token: {self.token_ms:.2f} ms ({1e3 / self.token_ms:.2f} t/s)",
                 f"  CPU sparse FFN: {self.cpu_ffn_ms:.2f} ms ({self.cpu_ffn_ms / self.token_ms:.0%}) in {n_cpu}/"
                 f"{len(self.layers)} layers, {self.cpu_ffn_bytes / 1e6:.1f} MB of rows at {self.cpu_gbps:.1f} GB/s, "
                 f"{self.cpu_threads} threads",
                 f"  the rest: {self.rest_ms:.2f} ms (attention, predictors, output, GPU work, CPU-GPU hand-offs, "
                 "the Python loop's greedy pick)",
                 "", "| layer | rows computed | CPU ms/token | CPU GB/s | GPU rows |", "|---:|---:|---:|---:|---:|"]
        gpu = {p.layer: p.gpu_rows for p in self.placement}
        for s in self.layers:
            lines.append(f"| {s.layer} | {s.computed_share:.3f} | {s.cpu_ms_per_token:.3f} | {s.cpu_gbps:.1f} | "
                         f"{gpu.get(s.layer, 0)} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("model", "budget_bytes", "threads", "n_tokens", "token_ms",
                                            "cpu_ffn_ms", "cpu_ffn_bytes", "cpu_threads")}
        d["rest_ms"], d["cpu_gbps"] = self.rest_ms, self.cpu_gbps
        d["layers"] = [asdict(s) for s in self.layers]
        d["placement"] = [asdict(p) for p in self.placement]
        return d


def profile_decode(path: str, budget: str | int = 0, n_threads: int | None = None, n_prompt: int = 64,
                   n_gen: int = 64, prompt: str = "The history of the language") -> DecodeProfile:
    """Decode ``n_gen`` tokens greedily after an ``n_prompt``-token prompt and split the time
    per token into the CPU sparse FFN (the kernel's own counters) and the rest."""
    import time

    from .. import Llama

    if n_gen < 1 or n_prompt < 1:
        raise ValueError("the profile needs at least one prompt and one decoded token")
    check_gguf(path)
    threads = n_threads or os.cpu_count() or 1
    llm = Llama(str(path), vram_budget=budget, n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                n_batch=max(n_prompt, 8), verbose=False)
    try:
        if llm.sparse_mode == "stock":
            raise ValueError(f"{path} has no sparse layout: nothing to profile (pi-convert makes one)")
        toks = llm.tokenize(prompt.encode())
        toks = (toks * (n_prompt // max(len(toks), 1) + 1))[:n_prompt]
        llm.reset()
        llm.eval(toks)
        llm.reset_sparse_stats()
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([int(_last_logits(llm).argmax())])
        wall = time.perf_counter() - t0
        layers, placement = llm.sparse_stats(), llm.placement()
    finally:
        llm.close()
    return DecodeProfile(str(path), int(llm.vram_budget), threads, n_gen, 1e3 * wall / n_gen, layers, placement)
