"""Patch 0002: our llama.cpp computes the FFN activation the file states (dense path)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import eval_logits, pi_llama
from powerinfer_gguf.forward import forward, gguf_weights


def _llama_logits(path, tokens, **kw):
    """Upstream's binding over our library: the dense path as llama.cpp's own Llama drives it."""
    return eval_logits(path, tokens, n_ctx=64, upstream=True, **kw)[0]


@pytest.fixture(scope="module")
def drelu_model(tmp_path_factory):
    from powerinfer_gguf.synth import synthesize
    return synthesize(tmp_path_factory.mktemp("drelu") / "d.gguf", "tiny", outtype="f32", act="drelu",
                      progress=False)


def _check(path, hp, tokens, **kw):
    from dataclasses import replace
    got = _llama_logits(path, tokens, **kw)
    act = kw.get("kv_overrides", {}).get("llama.hidden_activation", hp.act)
    want = forward(gguf_weights(path), replace(hp, act=act), np.array(tokens))
    err = np.abs(got - want).max()
    assert err < 2e-3 * max(1.0, np.abs(want).max()), err
    assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0
    return err


def test_relu_model_matches_numpy(tiny_model):
    res, _ = tiny_model
    _check(res.path, res.hparams, [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889, 450])


def test_drelu_model_matches_numpy(drelu_model):
    _check(drelu_model.path, drelu_model.hparams, [1, 450, 4996, 17354, 1701, 29916, 432, 17204])


def test_silu_through_kv_override_matches_numpy(tiny_model):
    """The same weights read as SwiGLU (the upstream llama function) through kv_overrides."""
    res, _ = tiny_model
    _check(res.path, res.hparams, [1, 15043, 3186, 29892, 445, 338], kv_overrides={"llama.hidden_activation": "silu"})


def test_unknown_activation_fails_the_load(tiny_model):
    """Refused at load, naming the value and the key (our Llama passes llama.cpp's reason on;
    upstream's says only that the load failed)."""
    res, _ = tiny_model
    with pytest.raises(ValueError, match="unsupported FFN activation 'swishish' in llama.hidden_activation"):
        pi_llama(res.path, n_ctx=64, kv_overrides={"llama.hidden_activation": "swishish"})
