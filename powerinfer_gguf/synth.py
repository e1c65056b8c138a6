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
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import format as fmt
from .forward import Hparams, attention, rms_norm

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

OUTTYPES = ("f32", "f16", "q4_0", "q8_0")
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
    """Cheap N(0, 1) samples: a 256-level quantile table indexed by random bytes."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        q = np.sort(np.random.default_rng(0).standard_normal(1 << 18))[(1 << 9)::(1 << 10)]
        self.table = (q / q.std()).astype(np.float32)

    def __call__(self, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
        n = int(np.prod(shape))
        idx = np.frombuffer(self.rng.bytes(n), dtype=np.uint8)
        return (self.table * np.float32(std))[idx].reshape(shape)


def hparams_for(preset: str, act: str = "relu") -> Hparams:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    d, f, L, h, hkv = PRESETS[preset]
    return Hparams(n_vocab=32000, n_embd=d, n_ff=f, n_layer=L, n_head=h, n_head_kv=hkv, act=act)


def _tensor_plan(hp: Hparams) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes ([n_out, n_in]) in the order the file stores them."""
    d, f, dkv = hp.n_embd, hp.n_ff, hp.n_head_kv * hp.head_dim
    plan: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (hp.n_vocab, d))]
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        plan += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (d, d)),
                 (b + "attn_k.weight", (dkv, d)), (b + "attn_v.weight", (dkv, d)),
                 (b + "attn_output.weight", (d, d)), (b + "ffn_norm.weight", (d,)),
                 (b + "ffn_gate.weight", (f, d)), (b + "ffn_up.weight", (f, d)),
                 (b + "ffn_down.weight", (d, f))]
    plan += [("output_norm.weight", (d,)), ("output.weight", (hp.n_vocab, d))]
    return plan


def _pi_tensor_plan(hp: Hparams, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """Our sparse layout of the same model (docs/FORMAT.md), in file order."""
    d, f = hp.n_embd, hp.n_ff
    T = fmt.Tensors
    plan: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in _tensor_plan(hp):
        if not name.endswith("ffn_down.weight"):
            plan.append((name, shape))
            continue
        il = int(name.split(".")[1])
        plan += [(T.FFN_DOWN_T.format(il), (f, d)), (T.PRED_FC1.format(il), (rank, d)),
                 (T.PRED_FC2.format(il), (f, rank)), (T.PRED_THRESHOLD.format(il), (f,)),
                 (T.NEURON_FREQ.format(il), (f,))]
    # a layer's file order: ..., gate, up, down_t, fc1, fc2, threshold, freq (as synthesize writes)
    return plan


def _store_dtype(name: str, shape: tuple[int, ...], outtype: str) -> type:
    # Norms stay F32, as llama.cpp's converter writes them.
    return np.float32 if len(shape) == 1 or outtype == "f32" else np.float16


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


def synthesize(out: str | os.PathLike, preset: str = "tiny", *, outtype: str = "f16",
               target: FiringTarget = FiringTarget(), seed: int = 0, act: str = "relu",
               gate_rank: int | None = None, calib_tokens: int | None = None,
               heldout_tokens: int | None = None, vocab: str = "llama-spm",
               hparams: Hparams | None = None, hf_dir: str | os.PathLike | None = None,
               pi_out: str | os.PathLike | None = None, progress: bool = True) -> SynthResult:
    """Write a synthetic model GGUF (and optionally an HF checkpoint of the same weights).

    ``pi_out``: also write our sparse layout of the same weights (what pi-convert would make of
    the HF checkpoint), in the same pass: neurons ranked by their planted firing rates, down
    stored row per neuron, and as predictor the generator's own low-rank gate signal (the gate
    minus its full-rank noise) with a threshold at -PRED_Z noise deviations, measured on held-out
    tokens like pi-convert's. Minutes instead of pi-convert's ~20 at 7B: device-sized runs."""
    import gguf
    from tqdm import tqdm

    from .build import bin_path, vocab_path

    t0 = time.time()
    out = Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if act not in ("relu", "drelu"):
        raise ValueError(f"synthetic models are ReLU-family: act must be relu or drelu, not {act!r}")
    target.check()
    vocab_file = vocab_path(vocab)
    hp = hparams or hparams_for(preset, act)
    hp = replace(hp, act=act)
    if hp.n_embd % hp.n_head or hp.n_head % hp.n_head_kv or hp.head_dim % 2:
        raise ValueError(f"inconsistent heads: n_embd {hp.n_embd}, n_head {hp.n_head}, n_head_kv {hp.n_head_kv}")
    if pi_out is not None and outtype not in ("f32", "f16"):
        raise ValueError(f"--pi writes f32 or f16 (quantize it with pi-quantize), not {outtype}")
    if outtype.startswith("q") and (hp.n_embd % 32 or hp.n_ff % 32):
        raise ValueError(f"{outtype} needs n_embd and n_ff divisible by 32 (got {hp.n_embd}, {hp.n_ff})")
    big = hp.n_embd >= 4096
    calib_tokens = calib_tokens or (256 if big else 512)
    heldout_tokens = heldout_tokens or (128 if big else 512)
    gate_rank = gate_rank or max(8, hp.n_embd // 16)
    seq_len = 16  # many short sequences: tokens of one sequence share context, so fewer, longer ones calibrate worse
    n_cal_seq = max(1, calib_tokens // seq_len)
    n_ho_seq = max(1, heldout_tokens // seq_len)

    rng = np.random.default_rng(seed)
    normal = NormalTable(rng)
    rates = power_law_rates(hp.n_ff, target)

    out.parent.mkdir(parents=True, exist_ok=True)
    f16_path = out if outtype in ("f32", "f16") else out.with_name(out.name + ".f16.tmp")
    tmp = f16_path.with_name(f16_path.name + ".part")
    hf: HFCheckpointWriter | None = None
    pi_path = Path(pi_out) if pi_out is not None else None
    pi_tmp = pi_path.with_name(pi_path.name + ".part") if pi_path is not None else None
    pw = None
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        n_vocab = _copy_vocab(w, vocab_file)
        hp = replace(hp, n_vocab=n_vocab)
        if hf_dir is not None:
            hf = HFCheckpointWriter(Path(hf_dir), hp, vocab_file, outtype)
        K = fmt.Keys.Synth

        def header(wr, ours: bool) -> None:
            fmt.write_llama_kv(wr, hp, f"powerinfer-synth-{preset}")
            wr.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
            wr.add_uint32(fmt.Keys.FORMAT_VERSION, fmt.FORMAT_VERSION)
            wr.add_string(K.PRESET, preset if hparams is None else "custom")
            wr.add_uint32(K.SEED, seed)
            wr.add_float32(K.FIRING_MEAN_TARGET, target.mean)
            wr.add_float32(K.HOT_SHARE_TARGET, target.hot_share)
            wr.add_float32(K.HOT_MASS_TARGET, target.hot_mass)
            wr.add_float32(K.FIRING_MEAN, -1.0)  # measured values are patched in at the end
            wr.add_float32(K.HOT_MASS, -1.0)
            wr.add_uint32(K.GATE_RANK, gate_rank)
            wr.add_uint32(K.BIAS_CHANNEL, BIAS_CHANNEL)
            if ours:
                P = fmt.Keys
                wr.add_bool(P.SPARSE, True)
                wr.add_string(P.FFN_DOWN_LAYOUT, "neuron_rows")
                wr.add_string(P.PREDICTOR_ACT, "none")
                wr.add_float32(P.PREDICTOR_RECALL_TARGET, PRED_RECALL)
                wr.add_array(P.PREDICTOR_RECALL, [-1.0] * hp.n_layer)     # measured, patched in
                wr.add_array(P.PREDICTOR_PRECISION, [-1.0] * hp.n_layer)
                wr.add_uint32(P.CALIB_TOKENS, n_cal_seq * seq_len)

        def begin(wr, tensors) -> None:
            for name, shape in tensors:
                dt = _store_dtype(name, shape, outtype)
                wr.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
            wr.write_header_to_file()
            wr.write_kv_data_to_file()
            wr.write_ti_data_to_file()

        header(w, False)
        plan = _tensor_plan(hp)
        begin(w, plan)
        pi_plan = _pi_tensor_plan(hp, gate_rank + 1) if pi_path is not None else []
        if pi_path is not None:
            pw = gguf.GGUFWriter(pi_tmp, "llama")
            _copy_vocab(pw, vocab_file)
            header(pw, True)
            begin(pw, pi_plan)
        pi_recall: list[float] = []
        pi_precision: list[float] = []

        def put(name: str, arr: np.ndarray) -> None:
            expect_name, expect_shape = plan[len(put_order)]
            assert name == expect_name and arr.shape == expect_shape, (name, arr.shape, expect_name)
            w.write_tensor_data(np.ascontiguousarray(arr, dtype=_store_dtype(name, arr.shape, outtype)))
            put_order.append(name)
            if hf is not None:
                hf.add(name, arr)

        put_order: list[str] = []
        pi_order: list[str] = []

        def pi_put(name: str, arr: np.ndarray) -> None:
            if pw is None:
                return
            expect_name, expect_shape = pi_plan[len(pi_order)]
            assert name == expect_name and arr.shape == expect_shape, (name, arr.shape, expect_name)
            pw.write_tensor_data(np.ascontiguousarray(arr, dtype=_store_dtype(name, arr.shape, outtype)))
            pi_order.append(name)

        def both(name: str, arr: np.ndarray) -> None:
            put(name, arr)
            pi_put(name, arr)

        d, f = hp.n_embd, hp.n_ff
        emb = normal((hp.n_vocab, d))
        emb[:, BIAS_CHANNEL] = 1.0
        both("token_embd.weight", emb)
        # Random token sequences: calibration sets the biases, held-out ones measure the result.
        toks = rng.integers(3, hp.n_vocab, size=(n_cal_seq + n_ho_seq, seq_len))
        xs = [emb[t].copy() for t in toks]
        del emb
        pos = np.arange(seq_len)
        ones = np.ones(d, dtype=np.float32)
        per_layer_mean, per_layer_hot = [], []
        bar = tqdm(range(hp.n_layer), desc=f"synth {preset}", unit="layer", disable=not progress)
        for il in bar:
            b = f"blk.{il}."
            both(b + "attn_norm.weight", ones)
            wq = normal((d, d), d ** -0.5)
            wk = normal((hp.n_head_kv * hp.head_dim, d), d ** -0.5)
            wv = normal((hp.n_head_kv * hp.head_dim, d), d ** -0.5)
            wo = normal((d, d), d ** -0.5)
            wo[BIAS_CHANNEL] = 0.0
            att = [attention(rms_norm(x, ones, hp.rms_eps), wq, wk, wv, wo, hp, pos) for x in xs]
            scale = ATTN_OUT_RMS / max(float(np.sqrt(np.mean(np.concatenate(att) ** 2))), 1e-6)
            wo *= scale
            for x, a in zip(xs, att):
                x += a * scale
            del att
            for name, arr in (("attn_q", wq), ("attn_k", wk), ("attn_v", wv), ("attn_output", wo)):
                both(b + name + ".weight", arr)
            del wq, wk, wv, wo
            both(b + "ffn_norm.weight", ones)

            xn = [rms_norm(x, ones, hp.rms_eps) for x in xs]
            # Gate: low-rank signal (unit variance on the FFN input) plus a little full-rank noise.
            A = normal((f, gate_rank))
            B = normal((gate_rank, d), (gate_rank * d) ** -0.5)
            gate = A @ B
            if pw is None:
                del A, B
            gate += normal((f, d), (GATE_NOISE / d) ** 0.5)
            gate[:, BIAS_CHANNEL] = 0.0
            up = normal((f, d), d ** -0.5)
            if act == "drelu":
                # dReLU also zeroes neurons whose up is negative: give up its own bias so that
                # about 70% of up values pass, and calibrate the gate for the rest.
                up[:, BIAS_CHANNEL] = 0.5
            cal = np.concatenate(xn[:n_cal_seq])
            s = cal @ gate.T                       # [T, f], without the bias term
            u = cal[:, BIAS_CHANNEL:BIAS_CHANNEL + 1]  # [T, 1], > 0
            p_j = rng.permutation(rates)           # hot neurons scattered over indices
            if act == "drelu":
                up_pass = np.clip(((cal @ up.T) > 0).mean(axis=0), 1e-3, 1.0)
                p_j = np.clip(p_j / up_pass, 0, 1)
            # fire iff s + b*u > 0 iff s/u > -b: b_j = -quantile(s_j/u, 1 - p_j). The threshold
            # is the order statistic X_(k) (1-based) with k = (n + 1)(1 - p): a new token exceeds
            # it with probability (n + 1 - k)/(n + 1) = p exactly, where the plain sample quantile
            # would overshoot cold neurons' rates by ~1/n (60% at n = 128, p = 1%).
            n = len(cal)
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
            gate[:, BIAS_CHANNEL] = bias
            if pw is not None:
                # predictor = the gate's low-rank signal and bias: score = A (B x) + bias x_0
                fc1 = np.concatenate([B, np.eye(1, d, BIAS_CHANNEL, dtype=np.float32)])  # [rank, d]
                fc2 = np.concatenate([A, bias[:, None].astype(np.float32)], axis=1)      # [f, rank]
                noise_sd = float(np.std(cal @ gate.T - (cal @ fc1.T) @ fc2.T))
                del A, B
            del s, ratio, cal

            down = normal((d, f), 1.0)
            down[BIAS_CHANNEL] = 0.0
            hs = [np.maximum(x @ gate.T, 0) * (np.maximum(x @ up.T, 0) if act == "drelu" else x @ up.T)
                  for x in xn]
            hcat = np.concatenate(hs)
            ffo = hcat[: n_cal_seq * seq_len] @ down.T
            down *= FFN_OUT_RMS / max(float(np.sqrt(np.mean(ffo ** 2))), 1e-6)
            held = hcat[n_cal_seq * seq_len:] != 0
            counts = held.sum(axis=0)
            per_layer_mean.append(float(held.mean()))
            per_layer_hot.append(hot_mass_of(counts, target.hot_share))
            for x, h in zip(xs, hs):
                x += h @ down.T
            if pw is not None:
                # rows hot-to-cold by planted rate (dReLU: the gate rate times up's pass rate)
                freq = (p_j * up_pass if act == "drelu" else p_j).astype(np.float32)
                order = np.argsort(-freq, kind="stable")
                threshold = np.full(f, -PRED_Z * noise_sd, dtype=np.float32)
                ho = np.concatenate(xn[n_cal_seq:])
                pred = ((ho @ fc1.T) @ fc2.T) > threshold
                both_on = (pred & held).sum()
                pi_recall.append(float(both_on / max(1, held.sum())))
                pi_precision.append(float(both_on / max(1, pred.sum())))
                pi_put(b + "ffn_gate.weight", gate[order])
                pi_put(b + "ffn_up.weight", up[order])
                pi_put(fmt.Tensors.FFN_DOWN_T.format(il), down.T[order])
                pi_put(fmt.Tensors.PRED_FC1.format(il), fc1)
                pi_put(fmt.Tensors.PRED_FC2.format(il), fc2[order])
                pi_put(fmt.Tensors.PRED_THRESHOLD.format(il), threshold[order])
                pi_put(fmt.Tensors.NEURON_FREQ.format(il), freq[order])
                del fc1, fc2, ho, pred
            del hs, hcat, ffo, xn
            put(b + "ffn_gate.weight", gate)
            put(b + "ffn_up.weight", up)
            put(b + "ffn_down.weight", down)
            del gate, up, down
            bar.set_postfix(firing=f"{per_layer_mean[-1]:.3f}")
        both("output_norm.weight", ones)
        both("output.weight", normal((hp.n_vocab, d), d ** -0.5))
        w.close()
        if pw is not None:
            pw.close()

        profile = FiringProfile(per_layer_mean, per_layer_hot, target.hot_share, n_ho_seq * seq_len)
        # Measured values into the header (fixed-size float32 fields, in place).
        reader = gguf.GGUFReader(tmp, "r+")
        for key, val in ((K.FIRING_MEAN, profile.mean), (K.HOT_MASS, profile.hot_mass)):
            field = reader.fields[key]
            field.parts[field.data[0]][0] = val
        reader.data.flush() if hasattr(reader.data, "flush") else None
        del reader
        if pi_tmp is not None:
            reader = gguf.GGUFReader(pi_tmp, "r+")
            for key, val in ((K.FIRING_MEAN, profile.mean), (K.HOT_MASS, profile.hot_mass)):
                field = reader.fields[key]
                field.parts[field.data[0]][0] = val
            for key, vals in ((fmt.Keys.PREDICTOR_RECALL, pi_recall), (fmt.Keys.PREDICTOR_PRECISION, pi_precision)):
                field = reader.fields[key]
                for idx, v in zip(field.data, vals):
                    field.parts[idx][0] = v
            reader.data.flush() if hasattr(reader.data, "flush") else None
            del reader
            os.replace(pi_tmp, pi_path)
        os.replace(tmp, f16_path)
        if f16_path != out:
            quantize_file(bin_path("stock", "llama-quantize"), f16_path, out, outtype)
            f16_path.unlink()
        if hf is not None:
            hf.finish()
    except BaseException:
        if hf is not None:
            hf.abort()
        for p in (tmp, f16_path if f16_path != out else None, pi_tmp, pi_path):
            if p is not None and Path(p).exists():
                Path(p).unlink()
        raise
    return SynthResult(out, hp, profile, time.time() - t0, out.stat().st_size)


def quantize_file(quantize_bin: Path, src: Path, dst: Path, outtype: str, threads: int | None = None) -> None:
    """llama-quantize src -> dst (atomically: a failure leaves no dst)."""
    tmp = dst.with_name(dst.name + ".part")
    cmd = [str(quantize_bin), str(src), str(tmp), outtype.upper(), str(threads or os.cpu_count() or 2)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"llama-quantize {outtype} failed: {tail[0]}")
    os.replace(tmp, dst)


class HFCheckpointWriter:
    """The same weights as a Hugging Face LLaMA checkpoint (config.json, safetensors shards with
    their index, tokenizer.model + tokenizer_config.json), streamed: one shard per layer (plus
    one for the embeddings and one for the head), so a 70B shape writes in a layer's memory.
    The folder appears only when complete (written as <dest>.part, then renamed)."""

    def __init__(self, dest: Path, hp: Hparams, vocab_file: Path, outtype: str):
        import shutil

        self.dest, self.hp, self.vocab_file = Path(dest), hp, vocab_file
        self.dtype = np.float32 if outtype == "f32" else np.float16
        self.tmp = self.dest.with_name(self.dest.name + ".part")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
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
        save_file(self.pending, str(self.tmp / shard), metadata={"format": "pt"})
        self.weight_map.update({k: shard for k in self.pending})
        self.pending = {}

    def finish(self) -> None:
        import shutil

        from .hf import write_sentencepiece_model

        if self.pending:
            self.flush()
        hp = self.hp
        (self.tmp / "model.safetensors.index.json").write_text(
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
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_sentencepiece_model(self.vocab_file, self.tmp / "tokenizer.model")
        (self.tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
        if self.dest.exists():
            shutil.rmtree(self.dest)
        os.replace(self.tmp, self.dest)

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
