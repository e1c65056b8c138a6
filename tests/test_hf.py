from __future__ import annotations

import numpy as np
import pytest

from powerinfer_gguf.hf import SentencePieceModel, hf_tensor_name, permute_qk_to_gguf, permute_qk_to_hf


def test_qk_permutation_is_invertible_and_matches_rope_conventions():
    """HF rotates halves of a head; llama.cpp rotates adjacent pairs: the permutation maps one
    onto the other, so q·k scores agree."""
    from powerinfer_gguf.forward import rope

    rng = np.random.default_rng(0)
    n_head, hd, d = 2, 8, 16
    w_hf = rng.standard_normal((n_head * hd, d))
    w_gg = permute_qk_to_gguf(w_hf, n_head)
    np.testing.assert_array_equal(permute_qk_to_hf(w_gg, n_head), w_hf)
    x = rng.standard_normal((5, d))
    pos = np.arange(5)
    # llama.cpp: adjacent pairs
    q_gg = rope((x @ w_gg.T).reshape(5, n_head, hd), pos, 10000.0)
    # HF: rotate_half on halves
    q = (x @ w_hf.T).reshape(5, n_head, hd)
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang = np.concatenate([pos[:, None] * inv] * 2, axis=-1)[:, None, :]
    rot = np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], axis=-1)
    q_hf = q * np.cos(ang) + rot * np.sin(ang)
    # same vectors up to the row permutation within each head
    np.testing.assert_allclose(permute_qk_to_gguf(q_hf.reshape(5, -1).T, n_head).T,
                               q_gg.reshape(5, -1), rtol=1e-10, atol=1e-10)


def test_names():
    assert hf_tensor_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError):
        hf_tensor_name("blk.0.nonsense.weight")


def test_sentencepiece_roundtrip_and_corruption():
    m = SentencePieceModel(["<unk>", "<s>", "</s>", "▁hi", "<0x41>"], [0.0, 0.0, 0.0, -1.5, 0.0], [2, 3, 3, 1, 6])
    data = m.encode()
    back = SentencePieceModel.decode(data)
    assert back.pieces == m.pieces and back.types == m.types and back.pad_id == -1
    assert back.scores == pytest.approx(m.scores)
    with pytest.raises(ValueError, match="corrupt"):
        SentencePieceModel.decode(data[:-3])
    with pytest.raises(ValueError):
        SentencePieceModel.decode(b"")
