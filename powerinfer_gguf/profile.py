"""Activation profiling: run calibration text through the model, one layer at a time.

All calibration sequences pass layer L before any touches layer L+1, so only one layer's weights
are read at a time (memory-mapped from the checkpoint): a 7B model profiles in a few GB of RAM.
For each layer the visitor receives the FFN inputs (after the norm), the gate pre-activations and
the true active masks of every token; it keeps what it needs (frequencies, predictor samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .forward import FFNActivation, Hparams, layer_step

DEFAULT_CORPUS = "pydoc_data.topics (Python's own documentation prose, ~465 KB, ships with Python)"


def default_corpus() -> str:
    """Real English prose that every Python has: the stdlib's pydoc topic texts."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_sequences(tokenize: Callable[[str], list[int]], text: str, n_tokens: int,
                          seq_len: int = 128, bos: int | None = None) -> list[np.ndarray]:
    """Cut tokenized text into sequences of ``seq_len`` (each led by BOS when given), up to
    ``n_tokens`` tokens in all, taken evenly across the whole text."""
    if n_tokens < 2:
        raise ValueError("need at least 2 calibration tokens")
    ids = tokenize(text)
    body = seq_len - (1 if bos is not None else 0)
    n_seq_avail = len(ids) // body
    if n_seq_avail < 1:
        raise ValueError(f"calibration text too short: {len(ids)} tokens, need at least {body}")
    n_seq = max(1, min(n_seq_avail, -(-n_tokens // seq_len)))
    starts = np.linspace(0, (n_seq_avail - 1) * body, n_seq).astype(int)
    seqs = []
    for s in starts:
        chunk = ids[s:s + body]
        seqs.append(np.array(([bos] if bos is not None else []) + list(chunk), dtype=np.int64))
    return seqs


@dataclass
class LayerObservation:
    layer: int
    ffn_in: np.ndarray     # [T, n_embd] float32, after ffn_norm
    gate: np.ndarray       # [T, n_ff] gate pre-activations
    active: np.ndarray     # [T, n_ff] bool: neuron contributes (ReLU kinds)
    seq_id: np.ndarray     # [T] which sequence each token came from
    w_gate: np.ndarray     # [n_ff, n_embd] the layer's gate weight (already read: predictors fit it)
    resid: np.ndarray      # [T, n_embd] the residual stream ffn_norm takes (PowerInfer's predictors read it)


def profile(get: Callable[[str], np.ndarray], hp: Hparams, seqs: Iterable[np.ndarray],
            visit: Callable[[LayerObservation], None], progress: bool = True) -> None:
    """Forward ``seqs`` through the model (GGUF tensor names via ``get``), layer by layer,
    calling ``visit`` with each layer's FFN observation."""
    from tqdm import tqdm

    if hp.act not in ("relu", "drelu"):
        raise ValueError(f"profiling needs a ReLU-family activation, not {hp.act!r}")
    seqs = list(seqs)
    emb = get("token_embd.weight")
    xs = [emb[s].astype(np.float32) for s in seqs]
    del emb
    seq_id = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)])
    for il in tqdm(range(hp.n_layer), desc="profile", unit="layer", disable=not progress):
        def observe(xn: np.ndarray, ffn: FFNActivation, w_gate: np.ndarray, il=il) -> None:
            visit(LayerObservation(il, xn, ffn.gate, ffn.active(hp.act), seq_id, w_gate, np.concatenate(xs)))

        layer_step(get, il, hp, xs, observe)
