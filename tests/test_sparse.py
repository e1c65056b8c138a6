"""Patches 0004/0005: the predictor-gated sparse FFN in llama.cpp, checked against the dense path
and against a numpy reference of the same semantics."""
from __future__ import annotations

import numpy as np
import pytest

from powerinfer_gguf.forward import forward

TOKENS = [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889, 450, 4996, 17354, 1701, 29916, 432, 17204]


def _weights(path):
    import gguf
    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}


def _llm(path, **kw):
    from powerinfer_gguf import Llama
    kw.setdefault("n_ctx", 256)
    return Llama(str(path), n_batch=64, n_threads=2, verbose=False, **kw)


def _logits(path, tokens, one_by_one=False, **kw):
    """Logits of every position: one eval of the whole sequence, or one token per eval (decode)."""
    llm = _llm(path, logits_all=True, **kw)
    if one_by_one:
        for t in tokens:
            llm.eval([t])
    else:
        llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)]), llm


def _greedy(llm, prompt, n):
    import llama_cpp
    llm.eval(prompt)
    toks, logits = [], []
    for _ in range(n):
        lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        t = int(lg.argmax())
        toks.append(t)
        logits.append(lg)
        llm.eval([t])
    return toks, np.array(logits)


def test_all_active_equals_dense(tiny_pi):
    """Every neuron forced active on the sparse path == the dense FFN (same tokens, close logits)."""
    _, ours, _ = tiny_pi
    dense, d_llm = _logits(ours, TOKENS, one_by_one=True, sparse=False)
    full, f_llm = _logits(ours, TOKENS, one_by_one=True, all_active=True)
    assert d_llm.sparse_mode == "dense" and f_llm.sparse_mode == "sparse"
    assert f_llm.sparse_stats()[0].computed_share == 1.0
    err = np.abs(full - dense).max()
    assert err < 1e-4 * max(1.0, np.abs(dense).max()), err
    assert (full.argmax(-1) == dense.argmax(-1)).all()


def test_sparse_matches_numpy_reference(tiny_pi):
    """The sparse path computes exactly the neurons the predictor selects (numpy, same rule), for
    decode (one token per eval) and for a many-token ubatch (sparse_max_tokens raised)."""
    res, ours, _ = tiny_pi
    w = _weights(ours)
    import gguf
    pact = gguf.GGUFReader(ours).fields["powerinfer.predictor.act"].contents()

    def mask(il, xn):
        z = xn @ w[f"blk.{il}.pi_pred_fc1.weight"].T
        if pact == "relu":
            z = np.maximum(z, 0)
        return z @ w[f"blk.{il}.pi_pred_fc2.weight"].T > w[f"blk.{il}.pi_pred_threshold"]

    want = forward(w, res.hparams, np.array(TOKENS), ffn_mask=mask)
    dense_ref = forward(w, res.hparams, np.array(TOKENS))
    assert np.abs(want - dense_ref).max() > 0  # the predictor really drops neurons here
    for kw in ({"one_by_one": True}, {"sparse_max_tokens": 64}):
        got, llm = _logits(ours, TOKENS, **kw)
        err = np.abs(got - want).max()
        assert err < 2e-3 * max(1.0, np.abs(want).max()), (kw, err)
        st = llm.sparse_stats()
        assert all(s.tokens == len(TOKENS) for s in st)
        assert all(0 < s.computed_share < 0.5 and s.fired <= s.predicted for s in st)


def test_prompt_takes_dense_path_by_default(tiny_pi):
    _, ours, _ = tiny_pi
    _, llm = _logits(ours, TOKENS)  # one 16-token ubatch
    assert all(s.tokens == 0 for s in llm.sparse_stats())
    llm.eval([450])
    assert all(s.tokens == 1 for s in llm.sparse_stats())
    llm.reset_sparse_stats()
    assert all(s.tokens == 0 and s.predicted == 0 for s in llm.sparse_stats())


def test_greedy_text_with_predictor_matches_dense(tiny_pi, capsys):
    """128 greedy tokens: sparse (trained predictor) against dense on the same file."""
    _, ours, _ = tiny_pi
    prompt = TOKENS[:6]
    d_toks, d_logits = _greedy(_llm(ours, sparse=False), prompt, 128)
    s_llm = _llm(ours)
    s_toks, s_logits = _greedy(s_llm, prompt, 128)
    first = next((i for i, (a, b) in enumerate(zip(d_toks, s_toks)) if a != b), 128)
    same = float(np.mean(np.array(d_toks) == np.array(s_toks)))
    n = first  # logits comparable while the texts agree
    rel = float(np.abs(s_logits[:n] - d_logits[:n]).max() / np.abs(d_logits[:n]).max()) if n else 0.0
    share = np.mean([s.computed_share for s in s_llm.sparse_stats()])
    with capsys.disabled():
        print(f"\n[sparse vs dense, tiny] same tokens {same:.3f}, first difference at {first}, "
              f"max |dlogit|/max|logit| {rel:.2e} over the agreeing prefix, rows computed {share:.3f}")
    assert same >= 0.95
    assert rel < 0.05
    assert share < 0.5


def test_plain_gguf_runs_as_stock(tiny_model):
    res, _ = tiny_model
    llm = _llm(res.path)
    assert llm.sparse_mode == "stock" and llm.sparse_stats() == []
    out = llm("Hello", max_tokens=4)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("kw,msg", [
    ({"vram_budget": "1GiB"}, "CPU only"),
    ({"vram_budget": "lots"}, "bad size"),
    ({"sparse_max_tokens": -1}, "sparse_max_tokens"),
    ({"n_gpu_layers": 5}, "vram_budget"),
])
def test_bad_options_are_clear(tiny_pi, kw, msg):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match=msg):
        _llm(ours, **kw)


def test_bad_override_type_names_the_key(tiny_pi):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match="powerinfer.runtime.sparse must be a bool"):
        _llm(ours, kv_overrides={"powerinfer.runtime.sparse": 3})
