"""A plain numpy forward pass of a LLaMA-family model, in llama.cpp's (GGUF) conventions.

Weights are numpy arrays shaped [n_out, n_in] (a ggml tensor with ne = [n_in, n_out]); Q and K rows
are in llama.cpp's order, so RoPE rotates adjacent pairs (rope type NORM). The synthetic generator
builds its models with it, profiling reads it, and tests compare llama.cpp's logits against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np


@dataclass(frozen=True)
class Hparams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    act: str = "relu"  # relu (ReGLU), drelu, silu (SwiGLU)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """x [T, n_head, head_dim]; rotates pairs (2i, 2i+1) by pos * theta^(-2i/head_dim)."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # [T, hd/2]
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, hp: Hparams) -> np.ndarray:
    """Causal attention of one sequence's projections q [T, n_embd], k and v [T, n_kv]: [T, n_embd]
    before the output projection."""
    T, hd = q.shape[0], hp.head_dim
    pos = np.arange(T)
    q = rope(q.reshape(T, hp.n_head, hd), pos, hp.rope_theta)
    k = rope(k.reshape(T, hp.n_head_kv, hd), pos, hp.rope_theta)
    v = v.reshape(T, hp.n_head_kv, hd)
    rep = hp.n_head // hp.n_head_kv
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    scores = np.where(mask[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, hp.n_embd)


def attention_outputs(xs: list[np.ndarray], w_norm: np.ndarray, wq, wk, wv, wo, hp: Hparams) -> list[np.ndarray]:
    """What one layer's attention adds to each sequence's residual ``xs[i]`` [T_i, n_embd]. The
    projections take every sequence's tokens at once: a weight is read once, not per sequence."""
    ends = np.cumsum([len(x) for x in xs])[:-1]
    xn = rms_norm(np.concatenate(xs), w_norm, hp.rms_eps)
    qs, ks, vs = (np.split(xn @ w.T, ends) for w in (wq, wk, wv))
    return np.split(np.concatenate([attend(q, k, v, hp) for q, k, v in zip(qs, ks, vs)]) @ wo.T, ends)


@dataclass
class FFNActivation:
    """One FFN's per-token values for inputs xn [T, n_embd]: pre-activations and hidden values."""

    gate: np.ndarray    # [T, n_ff] gate pre-activations
    up: np.ndarray      # [T, n_ff]
    hidden: np.ndarray  # [T, n_ff] what the down projection takes

    def active(self, act: str) -> np.ndarray:
        """Neurons that contribute (ReLU kinds): the gate fires (and, for dReLU, up too)."""
        if act == "relu":
            return self.gate > 0
        if act == "drelu":
            return (self.gate > 0) & (self.up > 0)
        raise ValueError(f"a {act!r} FFN has no exact zeros: only relu and drelu neurons fire")


def ffn_activation(xn: np.ndarray, w_gate, w_up, act: str) -> FFNActivation:
    g = xn @ w_gate.T
    u = xn @ w_up.T
    if act == "relu":
        return FFNActivation(g, u, np.maximum(g, 0) * u)
    if act == "drelu":
        return FFNActivation(g, u, np.maximum(g, 0) * np.maximum(u, 0))
    if act == "silu":
        return FFNActivation(g, u, g / (1 + np.exp(-g)) * u)
    raise ValueError(f"unknown activation {act!r}")


def ffn_hidden(xn: np.ndarray, w_gate, w_up, act: str) -> np.ndarray:
    """The FFN's per-neuron hidden values h [T, n_ff]; a neuron 'fires' where h != 0 (ReLU kinds)."""
    return ffn_activation(xn, w_gate, w_up, act).hidden


def gguf_weights(path) -> dict[str, np.ndarray]:
    """Every tensor of an F32/F16/BF16 GGUF as float32 arrays by name, in the shapes forward() takes."""
    import gguf
    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}


def _down_rows(get: Callable[[str], np.ndarray], il: int) -> np.ndarray:
    """Layer il's down projection as [n_ff, n_embd] rows, from either layout."""
    try:
        return get(f"blk.{il}.ffn_down.weight").T
    except KeyError:
        return get(f"blk.{il}.ffn_down_t.weight")


def layer_step(get: Callable[[str], np.ndarray], il: int, hp: Hparams, xs: list[np.ndarray],
               on_ffn: Callable[[np.ndarray, FFNActivation, np.ndarray], np.ndarray | None] | None = None) -> None:
    """Layer ``il`` on every sequence's residual in ``xs`` (updated in place): attention per
    sequence, then the FFN over all their tokens at once. ``on_ffn(xn, ffn, w_gate)`` sees the
    FFN's input (after its norm), activation and gate weight (read once, for predictor fits); a
    hidden array it returns replaces ffn.hidden."""
    b = f"blk.{il}."
    att = attention_outputs(xs, get(b + "attn_norm.weight"), get(b + "attn_q.weight"), get(b + "attn_k.weight"),
                            get(b + "attn_v.weight"), get(b + "attn_output.weight"), hp)
    for x, a in zip(xs, att):
        x += a
    del att
    fn = get(b + "ffn_norm.weight")
    xn = np.concatenate([rms_norm(x, fn, hp.rms_eps) for x in xs])
    w_gate = get(b + "ffn_gate.weight")
    ffn = ffn_activation(xn, w_gate, get(b + "ffn_up.weight"), hp.act)
    h = on_ffn(xn, ffn, w_gate) if on_ffn is not None else None
    out = (ffn.hidden if h is None else h) @ _down_rows(get, il)
    o = 0
    for x in xs:
        x += out[o:o + len(x)]
        o += len(x)


@dataclass
class ForwardTrace:
    """What a forward pass saw per layer: FFN inputs (after norm) and active masks."""

    ffn_inputs: list[np.ndarray] = field(default_factory=list)
    active: list[np.ndarray] = field(default_factory=list)


def forward(weights: Mapping[str, np.ndarray] | Callable[[str], np.ndarray], hp: Hparams,
            tokens: np.ndarray, trace: ForwardTrace | None = None,
            ffn_mask: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Logits [T, n_vocab] for one sequence of token ids. ``weights`` maps GGUF tensor names
    (``blk.N.attn_q.weight``...) to float arrays, or is a function that loads one by name; a layer
    may hold ``ffn_down_t`` (our row-per-neuron layout) instead of ``ffn_down``.
    ``ffn_mask(layer, xn)`` -> bool [T, n_ff]: only those neurons are computed (the sparse engine's
    semantics, for checking it)."""
    get = weights if callable(weights) else weights.__getitem__

    def W(name: str) -> np.ndarray:
        return np.asarray(get(name), dtype=np.float32)

    tokens = np.asarray(tokens)
    x = W("token_embd.weight")[tokens]
    for il in range(hp.n_layer):
        def on_ffn(xn: np.ndarray, ffn: FFNActivation, _w_gate, il=il) -> np.ndarray:
            h = ffn.hidden
            if ffn_mask is not None:
                h = np.where(ffn_mask(il, xn), h, 0).astype(np.float32)
            if trace is not None:
                trace.ffn_inputs.append(xn)
                if hp.act != "silu":
                    trace.active.append(h != 0)
            return h

        layer_step(W, il, hp, [x], on_ffn)
    x = rms_norm(x, W("output_norm.weight"), hp.rms_eps)
    return x @ W("output.weight").T
