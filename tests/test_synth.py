"""The synthetic generator: asked firing profile == measured, from the file, by an independent pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

from powerinfer_gguf.synth import FiringTarget, hot_mass_of, power_law_rates


@pytest.mark.parametrize("mean,share,mass", [(0.10, 0.25, 0.80), (0.05, 0.2, 0.7), (0.2, 0.3, 0.6)])
def test_power_law_rates_hit_the_target(mean, share, mass):
    p = power_law_rates(4096, FiringTarget(mean, share, mass))
    assert abs(p.mean() - mean) < 1e-3
    assert abs(hot_mass_of(p, share) - mass) < 5e-3
    assert np.all(np.diff(p) <= 1e-12) and p.max() <= 1 and p.min() > 0


@pytest.mark.parametrize("bad", [FiringTarget(0.0), FiringTarget(0.1, 0.25, 0.2), FiringTarget(0.5, 0.1, 0.9)])
def test_impossible_profiles_are_refused(bad):
    with pytest.raises(ValueError):
        bad.check()


def _weights(path):
    import gguf
    r = gguf.GGUFReader(path)
    return {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors}, r


def test_measured_profile_matches_the_asked_one(tiny_model):
    res, _ = tiny_model
    prof = res.profile
    assert abs(prof.mean - 0.10) < 0.015
    assert abs(prof.hot_mass - 0.80) < 0.05
    for m in prof.per_layer_mean:
        assert 0.08 < m < 0.13


def test_firing_measured_independently_from_the_file(tiny_model):
    """Re-read the GGUF, run fresh tokens through a plain forward pass, count firing neurons."""
    from powerinfer_gguf.forward import ForwardTrace, Hparams, forward

    res, _ = tiny_model
    W, r = _weights(res.path)
    hp = res.hparams
    rng = np.random.default_rng(1234)
    counts = [np.zeros(hp.n_ff) for _ in range(hp.n_layer)]
    n = 0
    for _ in range(8):
        tr = ForwardTrace()
        forward(W, hp, rng.integers(3, hp.n_vocab, 64), tr)
        for i, a in enumerate(tr.active):
            counts[i] += a.sum(axis=0)
        n += 64
    means = [c.sum() / (n * hp.n_ff) for c in counts]
    assert abs(np.mean(means) - 0.10) < 0.015, means
    assert abs(np.mean([hot_mass_of(c, 0.25) for c in counts]) - 0.80) < 0.06
    # the file says what was measured
    stored = r.fields["powerinfer.synth.firing_mean"].contents()
    assert stored == pytest.approx(res.profile.mean, rel=1e-5)


def test_gate_is_low_rank_plus_noise(tiny_model):
    """Most of a gate's energy lies in gate_rank directions: a low-rank predictor can learn it."""
    res, _ = tiny_model
    W, r = _weights(res.path)
    rank = r.fields["powerinfer.synth.gate_rank"].contents()
    g = W["blk.1.ffn_gate.weight"][:, 1:]  # without the bias channel
    s = np.linalg.svd(g, compute_uv=False) ** 2
    assert s[:rank].sum() / s.sum() > 0.9


def test_hf_checkpoint_holds_the_same_weights(tiny_model):
    from powerinfer_gguf.hf import Checkpoint, SentencePieceModel, hf_tensor_name, permute_qk_to_gguf

    res, hf = tiny_model
    cfg = json.loads((hf / "config.json").read_text())
    hp = res.hparams
    assert cfg["hidden_act"] == "relu" and cfg["num_key_value_heads"] == hp.n_head_kv
    ck = Checkpoint(hf)  # sharded: one safetensors file per layer, with the index
    W, r = _weights(res.path)
    assert len(ck.names()) == len(W) and (hf / "model.safetensors.index.json").is_file()
    for name, w in W.items():
        h = ck.get(hf_tensor_name(name))
        if name.endswith("attn_q.weight"):
            h = permute_qk_to_gguf(h, hp.n_head)
        elif name.endswith("attn_k.weight"):
            h = permute_qk_to_gguf(h, hp.n_head_kv)
        np.testing.assert_array_equal(h, w, err_msg=name)
    spm = SentencePieceModel.decode((hf / "tokenizer.model").read_bytes())
    assert spm.pieces == r.fields["tokenizer.ggml.tokens"].contents()
    assert spm.types == r.fields["tokenizer.ggml.token_type"].contents()


def test_llama_cpp_loads_and_runs_the_model(tiny_model):
    """llama.cpp (our lib) loads the file with its real vocabulary and generates."""
    import llama_cpp

    res, _ = tiny_model
    llm = llama_cpp.Llama(str(res.path), n_ctx=128, n_threads=2, verbose=False, seed=1)
    toks = llm.tokenize(b"Hello world, this is a test.")
    assert toks[0] == 1 and len(toks) > 5  # BOS + SentencePiece pieces of the llama vocab
    out = llm("Once upon a time", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantized_pair_written_directly_as_pi_quantize_writes_it(tmp_path, qtype):
    """A quantized pair streamed layer by layer (how 40B/70B shapes fit in memory) holds exactly the
    keys and tensor types pi-quantize gives the F16 pair of the same seed, and the same values up to
    one quantization step (F16 rounding before quantizing moves a few); our file runs sparse."""
    from dataclasses import replace

    import gguf

    from conftest import TOKENS, eval_logits
    from powerinfer_gguf.quantize import quantize
    from powerinfer_gguf.synth import hparams_for, synthesize

    hp = replace(hparams_for("tiny"), n_layer=2)
    for outtype in (qtype, "f16"):
        synthesize(tmp_path / f"s.{outtype}.gguf", "tiny", outtype=outtype, hparams=hp,
                   pi_out=tmp_path / f"p.{outtype}.gguf", progress=False)
    for side in "sp":
        quantize(tmp_path / f"{side}.f16.gguf", tmp_path / f"{side}.via.gguf", qtype)
        direct, via = (gguf.GGUFReader(tmp_path / f"{side}.{k}.gguf") for k in (qtype, "via"))
        keys = [{k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} for r in (direct, via)]
        assert keys[0] == keys[1]
        want = {t.name: t for t in via.tensors}
        assert sorted(t.name for t in direct.tensors) == sorted(want)  # llama-quantize moves output.weight first
        for t in direct.tensors:
            w = want[t.name]
            assert (t.tensor_type, list(t.shape)) == (w.tensor_type, list(w.shape)), t.name
            x, y = (gguf.quants.dequantize(u.data, u.tensor_type) for u in (t, w))
            assert np.abs(x - y).max() <= np.abs(y).max() / 7 + 1e-3, t.name
    assert sorted(p.name for p in tmp_path.iterdir() if qtype in p.name) == [f"p.{qtype}.gguf", f"s.{qtype}.gguf"]
    logits, llm = eval_logits(tmp_path / f"p.{qtype}.gguf", TOKENS[:8], one_by_one=True)
    assert llm.sparse_mode == "sparse" and np.isfinite(logits).all()


def test_bad_requests_leave_no_file(tmp_path):
    from powerinfer_gguf.synth import synthesize

    with pytest.raises(ValueError, match="unknown preset"):
        synthesize(tmp_path / "x.gguf", "nope")
    with pytest.raises(ValueError, match="divisible by 32"):
        from dataclasses import replace
        from powerinfer_gguf.synth import hparams_for
        synthesize(tmp_path / "x.gguf", "tiny", outtype="q4_0", hparams=replace(hparams_for("tiny"), n_ff=700))
    assert not list(tmp_path.iterdir())
