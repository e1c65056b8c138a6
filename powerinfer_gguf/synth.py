"""Synthetic power-law ReLU LLaMA models, of any shape, that really fire as asked.

Real 7B-70B ReLU checkpoints cannot be downloaded here, so benchmarks and tests build their own.
The FFN is a real ReGLU (``relu(gate·x) * (up·x)``), not a faked mask; the firing rate of each
neuron is set through a *bias channel*:

- hidden dimension 0 is a constant: every token embedding holds ``1.0`` there, and no attention
  output or FFN down row ever writes it, so after RMSNorm the FFN input carries ``u = 1/rms(x) > 0``;
- a neuron's gate weight on that channel, ``b_j``, shifts its pre-activation by ``b_j * u``;
- the generator runs calibration tokens through the model layer by layer (numpy, ``forward.py``) and
  sets each ``b_j`` to the empirical quantile that makes neuron ``j`` fire with its target rate ``p_j``;
- targets ``p_j`` follow a clipped power law fitted to a mean firing rate (default 10%) and a hot
  share (default: 25% of neurons give 80% of activations), scattered over neuron indices;
- gate rows are low rank plus a little noise, so a low-rank predictor can learn them (as in real
  models, where PowerInfer's rank-limited predictors reach high recall).

Held-out tokens (never used to calibrate) measure what was generated; the profile is printed and
stored in the file (``powerinfer.synth.*``, docs/FORMAT.md). Tensors are generated and written one
layer at a time, so a 70B shape streams to disk in a few GB of RAM. Random values come from a
256-level normal table indexed by random bytes: ~10x cheaper than ``standard_normal`` at 7B+.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import format as fmt
from .forward import Hparams, attention_outputs, ffn_activation, rms_norm
from .layout import (QUANT_OUTTYPES, GGUFOut, file_type, for_row_chunks, llama_layer_plan, sparse_plan,
                     tensor_name, write_sparse_keys)
from .outputs import check_outputs, staged

# name: (n_embd, n_ff, n_layer, n_head, n_head_kv); LLaMA-family shapes, 32000-token SPM vocab.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 704, 4, 4, 2),        # tests: GQA, 4 layers, ~20 MB F32
    "small": (512, 1408, 8, 8, 8),      # quick CPU runs
    "1b": (2048, 5504, 22, 16, 16),
    "3b": (3200, 8640, 26, 32, 32),     # OpenLLaMA-3B shape
    "7b": (4096, 11008, 32, 32, 32),    # LLaMA-2-7B / ReluLLaMA-7B
    "13b": (5120, 13824, 40, 40, 40),   # LLaMA-2-13B / ReluLLaMA-13B
    "40b": (8192, 22016, 58, 64, 8),    # a 40B LLaMA-family shape (~40.6B parameters)
    "70b": (8192, 28672, 80, 64, 8),    # LLaMA-2-70B / ReluLLaMA-70B
}

OUTTYPES = ("f32", "f16", *QUANT_OUTTYPES)
BIAS_CHANNEL = 0
ATTN_OUT_RMS = 0.5   # rms that attention adds to the residual per layer
FFN_OUT_RMS = 0.5    # ... and the FFN
GATE_NOISE = 0.05    # variance of the gate's full-rank noise, relative to its low-rank signal
PRED_Z = 1.9         # --pi: predictor threshold at -PRED_Z sd of the gate noise it does not see ...
PRED_RECALL = 0.99   # ... which keeps at least this share of firing neurons


@dataclass(frozen=True)
class FiringTarget:
    mean: float = 0.10       # mean firing rate over neurons
    hot_share: float = 0.25  # this share of neurons (hottest first) ...
    hot_mass: float = 0.80   # ... gives this share of all activations

    def check(self) -> None:
        if not 0 < self.mean < 1:
            raise ValueError(f"firing mean must be in (0, 1), got {self.mean}")
        if not 0 < self.hot_share < 1 or not 0 < self.hot_mass < 1:
            raise ValueError("hot share and hot mass must be in (0, 1)")
        if self.hot_mass < self.hot_share:
            raise ValueError(f"hot mass {self.hot_mass} below hot share {self.hot_share}: "
                             "the hottest neurons cannot give less than their share")
        if self.mean / self.hot_share * self.hot_mass > 1:
            raise ValueError(f"impossible profile: {self.hot_share:.0%} of neurons giving "
                             f"{self.hot_mass:.0%} of a {self.mean:.0%} mean would fire above 100%")


def power_law_rates(n: int, target: FiringTarget) -> np.ndarray:
    """Per-neuron firing rates, hottest first: p(x) = min(1, a * x^-b) at x = (i + 0.5) / n, with
    a and b solved so that mean(p) = target.mean and the top hot_share give hot_mass of sum(p)."""
    target.check()
    x = (np.arange(n) + 0.5) / n
    n_hot = max(1, int(round(target.hot_share * n)))

    def rates(b: float) -> np.ndarray:
        lo, hi = 0.0, 1.0 / target.mean
        for _ in range(60):  # a such that the clipped mean is right
            a = (lo + hi) / 2
            if np.minimum(1.0, a * target.mean * x ** -b).mean() < target.mean:
                lo = a
            else:
                hi = a
        return np.minimum(1.0, hi * target.mean * x ** -b)

    lo, hi = 0.0, 8.0
    for _ in range(60):  # hot mass grows with b
        b = (lo + hi) / 2
        p = rates(b)
        if p[:n_hot].sum() / p.sum() < target.hot_mass:
            lo = b
        else:
            hi = b
    return rates((lo + hi) / 2)


@dataclass
class FiringProfile:
    """Measured firing of a model on held-out tokens."""

    per_layer_mean: list[float]
    per_layer_hot_mass: list[float]   # mass of the hottest hot_share neurons (ranked by measurement)
    hot_share: float
    tokens: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_layer_mean))

    @property
    def hot_mass(self) -> float:
        return float(np.mean(self.per_layer_hot_mass))

    def table(self) -> str:
        rows = [f"firing profile on {self.tokens} held-out tokens: mean {self.mean:.3f}, "
                f"hottest {self.hot_share:.0%} of neurons give {self.hot_mass:.1%} of activations"]
        rows.append("layer  firing  hot-mass")
        for i, (m, h) in enumerate(zip(self.per_layer_mean, self.per_layer_hot_mass)):
            rows.append(f"{i:5d}  {m:6.3f}  {h:8.3f}")
        return "\n".join(rows)


def hot_mass_of(counts: np.ndarray, hot_share: float) -> float:
    """Share of all activations given by the hottest ``hot_share`` of neurons."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    n_hot = max(1, int(round(hot_share * len(c))))
    return float(c[:n_hot].sum() / max(c.sum(), 1e-12))


class NormalTable:
    """Cheap N(0, 1) samples: a 256-level quantile table indexed by random bytes, drawn a chunk per
    thread, each chunk from its own generator seeded by one draw of ``rng`` and the chunk's place
    (the same values whatever the number of cores)."""

    CHUNK = 1 << 22

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        q = np.sort(np.random.default_rng(0).standard_normal(1 << 18))[(1 << 9)::(1 << 10)]
        self.table = (q / q.std()).astype(np.float32)

    def __call__(self, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
        n = int(np.prod(shape))
        seed = int(self.rng.integers(1 << 62))
        table = self.table * np.float32(std)
        out = np.empty(n, np.float32)

        def chunk(s: int, e: int) -> None:
            idx = np.frombuffer(np.random.default_rng([seed, s]).bytes(e - s), dtype=np.uint8)
            out[s:e] = table[idx]  # 4x np.take(out=...), whose output is buffered

        for_row_chunks(n, self.CHUNK, chunk)
        return out.reshape(shape)


def hparams_for(preset: str, act: str = "relu") -> Hparams:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    d, f, L, h, hkv = PRESETS[preset]
    return Hparams(n_vocab=32000, n_embd=d, n_ff=f, n_layer=L, n_head=h, n_head_kv=hkv, act=act)


def _tensor_plan(hp: Hparams) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes ([n_out, n_in]) in the order the file stores them."""
    import gguf

    T, d = gguf.MODEL_TENSOR, hp.n_embd
    plan = [(tensor_name(T.TOKEN_EMBD), (hp.n_vocab, d))]
    for il in range(hp.n_layer):
        plan += llama_layer_plan(hp, il)
    return plan + [(tensor_name(T.OUTPUT_NORM), (d,)), (tensor_name(T.OUTPUT), (hp.n_vocab, d))]


def _copy_vocab(writer, vocab_file: Path) -> int:
    """Copy every tokenizer.* key of a vocab GGUF; returns its vocabulary size."""
    import gguf

    reader = gguf.GGUFReader(vocab_file)
    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value, vtype, sub = fmt.field_item(field)
        writer.add_key_value(name, value, vtype, sub)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if not n_vocab:
        raise ValueError(f"{vocab_file}: no tokenizer.ggml.tokens")
    return n_vocab


@dataclass
class SynthResult:
    path: Path
    hparams: Hparams
    profile: FiringProfile
    seconds: float
    bytes: int


@dataclass
class _Job:
    """One synthesis, checked: the shape, the token counts and where each output goes."""

    out: Path
    preset: str
    name: str              # preset, or "custom" for hparams given (powerinfer.synth.preset)
    outtype: str
    target: FiringTarget
    seed: int
    hp: Hparams
    gate_rank: int
    seq_len: int
    n_cal_seq: int
    n_ho_seq: int
    vocab_file: Path
    hf_dir: Path | None
    pi_out: Path | None

    @property
    def n_cal(self) -> int:
        return self.n_cal_seq * self.seq_len


def _check_job(out, preset: str, outtype: str, target: FiringTarget, seed: int, act: str, gate_rank,
               calib_tokens, heldout_tokens, vocab: str, hparams: Hparams | None, hf_dir, pi_out) -> _Job:
    """Every argument, before any work."""
    from .build import vocab_path

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if act not in ("relu", "drelu"):
        raise ValueError(f"synthetic models are ReLU-family: act must be relu or drelu, not {act!r}")
    target.check()
    vocab_file = vocab_path(vocab)
    hp = replace(hparams or hparams_for(preset, act), act=act)
    if hp.n_embd % hp.n_head or hp.n_head % hp.n_head_kv or hp.head_dim % 2:
        raise ValueError(f"inconsistent heads: n_embd {hp.n_embd}, n_head {hp.n_head}, n_head_kv {hp.n_head_kv}")
    if outtype.startswith("q") and (hp.n_embd % 32 or hp.n_ff % 32):
        raise ValueError(f"{outtype} needs n_embd and n_ff divisible by 32 (got {hp.n_embd}, {hp.n_ff})")
    big = hp.n_embd >= 4096
    seq_len = 16  # many short sequences: tokens of one sequence share context, so fewer, longer ones calibrate worse
    return _Job(Path(out), preset, preset if hparams is None else "custom", outtype, target, seed, hp,
                gate_rank or max(8, hp.n_embd // 16), seq_len,
                max(1, (calib_tokens or (256 if big else 512)) // seq_len),
                max(1, (heldout_tokens or (128 if big else 512)) // seq_len),
                vocab_file, Path(hf_dir) if hf_dir is not None else None,
                Path(pi_out) if pi_out is not None else None)


def _write_synth_keys(w, job: _Job, ours: bool) -> None:
    import gguf

    K = fmt.Keys.Synth
    fmt.write_llama_kv(w, job.hp, f"powerinfer-synth-{job.preset}")
    w.add_file_type(file_type(job.outtype))
    if job.outtype in QUANT_OUTTYPES:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_uint32(fmt.Keys.FORMAT_VERSION, fmt.FORMAT_VERSION)
    w.add_string(K.PRESET, job.name)
    w.add_uint32(K.SEED, job.seed)
    w.add_float32(K.FIRING_MEAN_TARGET, job.target.mean)
    w.add_float32(K.HOT_SHARE_TARGET, job.target.hot_share)
    w.add_float32(K.HOT_MASS_TARGET, job.target.hot_mass)
    w.add_float32(K.FIRING_MEAN, -1.0)  # measured values are patched in at the end
    w.add_float32(K.HOT_MASS, -1.0)
    w.add_uint32(K.GATE_RANK, job.gate_rank)
    w.add_uint32(K.BIAS_CHANNEL, BIAS_CHANNEL)
    if ours:  # recall and precision measured, patched in
        write_sparse_keys(w, "none", PRED_RECALL, [-1.0] * job.hp.n_layer, [-1.0] * job.hp.n_layer, job.n_cal)


class _Writers:
    """Where each generated tensor goes: the dense GGUF (and the HF checkpoint), our layout."""

    def __init__(self, job: _Job, dense: Path, pi: Path | None, hf: Path | None):
        self.dense = GGUFOut(dense, "llama", job.outtype)
        job.hp = replace(job.hp, n_vocab=_copy_vocab(self.dense.w, job.vocab_file))
        _write_synth_keys(self.dense.w, job, False)
        self.dense.begin(_tensor_plan(job.hp))
        self.pi = GGUFOut(pi, "llama", job.outtype) if pi is not None else None
        if self.pi is not None:
            _copy_vocab(self.pi.w, job.vocab_file)
            _write_synth_keys(self.pi.w, job, True)
            self.pi.begin(sparse_plan(_tensor_plan(job.hp), [job.gate_rank + 1] * job.hp.n_layer))
        self.hf = HFCheckpointWriter(hf, job.hp, job.vocab_file, job.outtype) if hf is not None else None

    def put(self, name: str, arr: np.ndarray) -> None:
        """A tensor of the dense model (and the HF checkpoint)."""
        self.dense.put(name, arr)
        if self.hf is not None:
            self.hf.add(name, arr)

    def both(self, name: str, arr: np.ndarray) -> None:
        """A tensor our layout stores as the dense model does."""
        self.put(name, arr)
        if self.pi is not None:
            self.pi.put(name, arr)

    def close(self) -> None:
        self.dense.close()
        if self.pi is not None:
            self.pi.close()
        if self.hf is not None:
            self.hf.finish()

    def abandon(self) -> None:
        self.dense.abandon()
        if self.pi is not None:
            self.pi.abandon()


@dataclass
class _LayerGate:
    """A layer's gate as generated: low-rank signal A @ B plus noise, biases set by calibration."""

    gate: np.ndarray     # [f, d], bias channel included
    up: np.ndarray       # [f, d]
    A: np.ndarray        # [f, rank]
    B: np.ndarray        # [rank, d]
    bias: np.ndarray     # [f]
    rates: np.ndarray    # [f] planted gate firing rates (dReLU: before up's pass rate)
    up_pass: np.ndarray | None  # [f] dReLU: share of tokens whose up value passes


def _attention_layer(job: _Job, normal: NormalTable, xs: list[np.ndarray], ones: np.ndarray, wr: _Writers,
                     il: int) -> None:
    """Random attention weights, scaled so they add ATTN_OUT_RMS to the residual; applied to xs."""
    hp, d = job.hp, job.hp.n_embd
    b = f"blk.{il}."
    wr.both(b + "attn_norm.weight", ones)
    wq = normal((d, d), d ** -0.5)
    wk = normal((hp.n_head_kv * hp.head_dim, d), d ** -0.5)
    wv = normal((hp.n_head_kv * hp.head_dim, d), d ** -0.5)
    wo = normal((d, d), d ** -0.5)
    wo[BIAS_CHANNEL] = 0.0
    att = attention_outputs(xs, ones, wq, wk, wv, wo, hp)
    scale = ATTN_OUT_RMS / max(float(np.sqrt(np.mean(np.concatenate(att) ** 2))), 1e-6)
    wo *= scale
    for x, a in zip(xs, att):
        x += a * scale
    for name, arr in (("attn_q", wq), ("attn_k", wk), ("attn_v", wv), ("attn_output", wo)):
        wr.both(b + name + ".weight", arr)
    wr.both(b + "ffn_norm.weight", ones)


def _calibrated_biases(s: np.ndarray, u: np.ndarray, p_j: np.ndarray) -> np.ndarray:
    """b_j such that neuron j fires (s + b*u > 0, u > 0) with probability p_j on a new token.

    fire iff s/u > -b: b_j = -quantile(s_j/u, 1 - p_j). The threshold is the order statistic
    X_(k) (1-based) with k = (n + 1)(1 - p): a new token exceeds it with probability
    (n + 1 - k)/(n + 1) = p exactly, where the plain sample quantile would overshoot cold
    neurons' rates by ~1/n (60% at n = 128, p = 1%)."""
    n, f = s.shape
    ratio = np.sort(s / u, axis=0)
    pos_ = np.clip((n + 1) * (1 - p_j) - 1, 0, n - 1)  # 0-based, fractional
    lo_i = np.floor(pos_).astype(int)
    hi_i = np.minimum(lo_i + 1, n - 1)
    frac = (pos_ - lo_i).astype(np.float32)
    cols = np.arange(f)
    bias = -((1 - frac) * ratio[lo_i, cols] + frac * ratio[hi_i, cols])
    on, off = p_j >= 1, p_j <= 0
    bias[on] = -ratio[0, on] + 1.0       # always on
    bias[off] = -ratio[-1, off] - 1.0    # never on
    return bias


def _gate_layer(job: _Job, normal: NormalTable, rng: np.random.Generator, rates: np.ndarray,
                cal: np.ndarray) -> _LayerGate:
    """Gate (low-rank signal of unit variance on the FFN input, plus a little full-rank noise) and
    up; each neuron's bias set on the calibration tokens ``cal`` for its planted rate."""
    d, f, r = job.hp.n_embd, job.hp.n_ff, job.gate_rank
    A = normal((f, r))
    B = normal((r, d), (r * d) ** -0.5)
    gate = A @ B
    gate += normal((f, d), (GATE_NOISE / d) ** 0.5)
    gate[:, BIAS_CHANNEL] = 0.0
    up = normal((f, d), d ** -0.5)
    drelu = job.hp.act == "drelu"
    if drelu:
        # dReLU also zeroes neurons whose up is negative: give up its own bias so that about 70%
        # of up values pass, and calibrate the gate for the rest.
        up[:, BIAS_CHANNEL] = 0.5
    p_j = rng.permutation(rates)           # hot neurons scattered over indices
    up_pass = np.clip(((cal @ up.T) > 0).mean(axis=0), 1e-3, 1.0) if drelu else None
    if drelu:
        p_j = np.clip(p_j / up_pass, 0, 1)
    bias = _calibrated_biases(cal @ gate.T, cal[:, BIAS_CHANNEL:BIAS_CHANNEL + 1], p_j)
    gate[:, BIAS_CHANNEL] = bias
    return _LayerGate(gate, up, A, B, bias, p_j, up_pass)


def _down_layer(job: _Job, normal: NormalTable, h_cal: np.ndarray) -> np.ndarray:
    """Random down projection, scaled so the FFN adds FFN_OUT_RMS on the calibration tokens."""
    d, f = job.hp.n_embd, job.hp.n_ff
    down = normal((d, f), 1.0)
    down[BIAS_CHANNEL] = 0.0
    ffo = h_cal @ down.T
    down *= FFN_OUT_RMS / max(float(np.sqrt(np.mean(ffo ** 2))), 1e-6)
    return down


def _pi_layer(job: _Job, wr: _Writers, il: int, g: _LayerGate, down: np.ndarray, cal: np.ndarray,
              heldout: np.ndarray, fired: np.ndarray) -> tuple[float, float]:
    """Our layout of the layer: rows hot to cold by planted rate; as predictor the gate's low-rank
    signal and bias (score = A (B x) + bias x_0), thresholded at -PRED_Z sd of the noise it does
    not see. Returns the predictor's recall and precision on the held-out tokens."""
    d, f = job.hp.n_embd, job.hp.n_ff
    fc1 = np.concatenate([g.B, np.eye(1, d, BIAS_CHANNEL, dtype=np.float32)])  # [rank, d]
    fc2 = np.concatenate([g.A, g.bias[:, None].astype(np.float32)], axis=1)   # [f, rank]
    noise_sd = float(np.std(cal @ g.gate.T - (cal @ fc1.T) @ fc2.T))
    freq = (g.rates * g.up_pass if g.up_pass is not None else g.rates).astype(np.float32)
    order = np.argsort(-freq, kind="stable")
    threshold = np.full(f, -PRED_Z * noise_sd, dtype=np.float32)
    pred = ((heldout @ fc1.T) @ fc2.T) > threshold
    both_on = (pred & fired).sum()
    b = f"blk.{il}."
    wr.pi.put(b + "ffn_gate.weight", g.gate, order)
    wr.pi.put(b + "ffn_up.weight", g.up, order)
    wr.pi.put_sparse_ffn_down(il, down, fc1, fc2, threshold, freq, order)
    return float(both_on / max(1, fired.sum())), float(both_on / max(1, pred.sum()))


def _ffn_layer(job: _Job, normal: NormalTable, rng: np.random.Generator, rates: np.ndarray,
               xs: list[np.ndarray], ones: np.ndarray, wr: _Writers, il: int) -> tuple[np.ndarray, tuple | None]:
    """The layer's FFN, generated for its planted rates and applied to xs; returns the held-out
    tokens' firing masks and (our layout) the predictor's recall and precision."""
    xn = [rms_norm(x, ones, job.hp.rms_eps) for x in xs]
    cal = np.concatenate(xn[:job.n_cal_seq])
    g = _gate_layer(job, normal, rng, rates, cal)
    h = ffn_activation(np.concatenate(xn), g.gate, g.up, job.hp.act).hidden  # every token at once
    down = _down_layer(job, normal, h[:job.n_cal])
    fired = h[job.n_cal:] != 0
    for x, o in zip(xs, np.split(h @ down.T, len(xs))):
        x += o
    pi_q = _pi_layer(job, wr, il, g, down, cal, np.concatenate(xn[job.n_cal_seq:]), fired) \
        if wr.pi is not None else None
    b = f"blk.{il}."
    wr.put(b + "ffn_gate.weight", g.gate)
    wr.put(b + "ffn_up.weight", g.up)
    wr.put(b + "ffn_down.weight", down)
    return fired, pi_q


def _generate(job: _Job, wr: _Writers, progress: bool) -> tuple[FiringProfile, list, list]:
    """Every tensor, in file order, generated layer by layer on the calibration and held-out
    tokens; returns the held-out firing profile and (our layout) each layer's recall and precision."""
    from tqdm import tqdm

    rng = np.random.default_rng(job.seed)
    normal = NormalTable(rng)
    rates = power_law_rates(job.hp.n_ff, job.target)
    hp = job.hp
    emb = normal((hp.n_vocab, hp.n_embd))
    emb[:, BIAS_CHANNEL] = 1.0
    wr.both("token_embd.weight", emb)
    # Random token sequences: calibration sets the biases, held-out ones measure the result.
    toks = rng.integers(3, hp.n_vocab, size=(job.n_cal_seq + job.n_ho_seq, job.seq_len))
    xs = [emb[t].copy() for t in toks]
    del emb
    ones = np.ones(hp.n_embd, dtype=np.float32)
    means, hots, recall, precision = [], [], [], []
    bar = tqdm(range(hp.n_layer), desc=f"synth {job.name}", unit="layer", disable=not progress)
    for il in bar:
        _attention_layer(job, normal, xs, ones, wr, il)
        fired, pi_q = _ffn_layer(job, normal, rng, rates, xs, ones, wr, il)
        means.append(float(fired.mean()))
        hots.append(hot_mass_of(fired.sum(axis=0), job.target.hot_share))
        if pi_q is not None:
            recall.append(pi_q[0])
            precision.append(pi_q[1])
        bar.set_postfix(firing=f"{means[-1]:.3f}")
    wr.both("output_norm.weight", ones)
    wr.both("output.weight", normal((hp.n_vocab, hp.n_embd), hp.n_embd ** -0.5))
    return FiringProfile(means, hots, job.target.hot_share, job.n_ho_seq * job.seq_len), recall, precision


def _patch_measured(path: Path, values: dict[str, float | list[float]]) -> None:
    """Measured values into a written header: fixed-size float32 fields (scalars or arrays), in place."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    for key, val in values.items():
        field = reader.fields[key]
        for idx, v in zip(field.data, val if isinstance(val, list) else [val]):
            field.parts[idx][0] = v
    reader.data.flush() if hasattr(reader.data, "flush") else None
    del reader


def _hf_names() -> re.Pattern:
    """What HFCheckpointWriter writes into its folder (what --force may replace)."""
    return re.compile(r"config\.json|tokenizer\.model|tokenizer_config\.json|model\.safetensors\.index\.json"
                      r"|model-\d{5}-of-\d{5}\.safetensors")


def synthesize(out: str | os.PathLike, preset: str = "tiny", *, outtype: str = "f16",
               target: FiringTarget = FiringTarget(), seed: int = 0, act: str = "relu",
               gate_rank: int | None = None, calib_tokens: int | None = None,
               heldout_tokens: int | None = None, vocab: str = "llama-spm",
               hparams: Hparams | None = None, hf_dir: str | os.PathLike | None = None,
               pi_out: str | os.PathLike | None = None, force: bool = False,
               progress: bool = True) -> SynthResult:
    """Write a synthetic model GGUF (and optionally an HF checkpoint of the same weights).

    ``pi_out``: also write our sparse layout of the same weights (what pi-convert would make of
    the HF checkpoint), in the same pass: neurons ranked by their planted firing rates, down
    stored row per neuron, and as predictor the generator's own low-rank gate signal (the gate
    minus its full-rank noise) with a threshold at -PRED_Z noise deviations, measured on held-out
    tokens like pi-convert's. Minutes instead of pi-convert's ~20 at 7B: device-sized runs.
    Outputs appear whole or not at all; an existing one is replaced only with ``force``."""
    t0 = time.time()
    job = _check_job(out, preset, outtype, target, seed, act, gate_rank, calib_tokens, heldout_tokens,
                     vocab, hparams, hf_dir, pi_out)
    check_outputs([job.out, job.pi_out], [job.vocab_file], force=force, make_parents=True,
                  folders={job.hf_dir: _hf_names()} if job.hf_dir else None)
    with staged() as st:
        dense = st.file(job.out)
        pi = st.file(job.pi_out) if job.pi_out else None
        wr = _Writers(job, dense, pi, st.folder(job.hf_dir) if job.hf_dir else None)
        try:
            profile, recall, precision = _generate(job, wr, progress)
            wr.close()
        except BaseException:
            wr.abandon()
            raise
        K = fmt.Keys
        measured = {K.Synth.FIRING_MEAN: profile.mean, K.Synth.HOT_MASS: profile.hot_mass}
        _patch_measured(dense, measured)
        if pi is not None:
            _patch_measured(pi, {**measured, K.PREDICTOR_RECALL: recall, K.PREDICTOR_PRECISION: precision})
        st.commit()
    return SynthResult(job.out, job.hp, profile, time.time() - t0, job.out.stat().st_size)


class HFCheckpointWriter:
    """The same weights as a Hugging Face LLaMA checkpoint (config.json, safetensors shards with
    their index, tokenizer.model + tokenizer_config.json), streamed into ``folder`` (the caller's
    temporary folder): one shard per layer (plus one for the embeddings and one for the head), so
    a 70B shape writes in a layer's memory."""

    def __init__(self, folder: Path, hp: Hparams, vocab_file: Path, outtype: str):
        self.dir, self.hp, self.vocab_file = Path(folder), hp, vocab_file
        self.dtype = np.float32 if outtype == "f32" else np.float16
        self.pending: dict[str, np.ndarray] = {}
        self.weight_map: dict[str, str] = {}
        self.n_shards = hp.n_layer + 2

    def add(self, name: str, arr: np.ndarray) -> None:
        from .hf import hf_tensor_name, permute_qk_to_hf

        if name.endswith("attn_q.weight"):
            arr = permute_qk_to_hf(arr, self.hp.n_head)
        elif name.endswith("attn_k.weight"):
            arr = permute_qk_to_hf(arr, self.hp.n_head_kv)
        self.pending[hf_tensor_name(name)] = np.ascontiguousarray(arr, dtype=self.dtype)
        if name in ("token_embd.weight", "output.weight") or name.endswith("ffn_down.weight"):
            self.flush()

    def flush(self) -> None:
        from safetensors.numpy import save_file

        shard = f"model-{len(set(self.weight_map.values())) + 1:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(self.pending, str(self.dir / shard), metadata={"format": "pt"})
        self.weight_map.update({k: shard for k in self.pending})
        self.pending = {}

    def finish(self) -> None:
        from .hf import write_sentencepiece_model

        if self.pending:
            self.flush()
        hp = self.hp
        (self.dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=1) + "\n")
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_act": hp.act, "hidden_size": hp.n_embd, "intermediate_size": hp.n_ff,
            "num_hidden_layers": hp.n_layer, "num_attention_heads": hp.n_head,
            "num_key_value_heads": hp.n_head_kv, "vocab_size": hp.n_vocab,
            "max_position_embeddings": hp.n_ctx_train, "rms_norm_eps": hp.rms_eps,
            "rope_theta": hp.rope_theta, "tie_word_embeddings": False,
            "torch_dtype": "float32" if self.dtype == np.float32 else "float16",
            "bos_token_id": 1, "eos_token_id": 2,
        }
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_sentencepiece_model(self.vocab_file, self.dir / "tokenizer.model")
        (self.dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
