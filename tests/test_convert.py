"""pi-convert on hand-made and synthetic checkpoints: dense logits, permutation, predictors, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from powerinfer_gguf.forward import forward, gguf_weights



def _llama_logits(path, tokens, **kw):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **kw)
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)])


TOKENS = [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889, 450, 4996]


def _synth(tmp, name, act="relu", **hp_changes):
    from powerinfer_gguf.synth import hparams_for, synthesize

    hp = replace(hparams_for("tiny", act), **hp_changes)
    return synthesize(tmp / f"{name}.gguf", "tiny", outtype="f32", act=act, hparams=hp,
                      hf_dir=tmp / f"{name}-hf", progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """relu GQA, relu MHA and dReLU checkpoints, each converted (f32) with a stock twin."""
    from powerinfer_gguf.convert import convert

    tmp = tmp_path_factory.mktemp("conv")
    out = {}
    for name, act, changes in (("gqa", "relu", {}), ("mha", "relu", {"n_head_kv": 4}), ("drelu", "drelu", {})):
        res = _synth(tmp, name, act, **changes)
        rep = convert(tmp / f"{name}-hf", tmp / f"{name}.pi.gguf", outtype="f32", calib_tokens=1536,
                      stock=tmp / f"{name}.stock.gguf", progress=False, log=lambda m: None)
        out[name] = (res, rep)
    return out


@pytest.mark.parametrize("name", ["gqa", "mha", "drelu"])
def test_dense_logits_match_numpy_of_the_original_weights(converted, name):
    """Our file (patched lib, dense path, neurons permuted hot->cold, down stored per neuron)
    computes what a numpy pass over the unpermuted HF weights computes."""
    res, rep = converted[name]
    want = forward(gguf_weights(res.path), res.hparams, np.array(TOKENS))
    dense = {"powerinfer.runtime.sparse": False}  # a stock twin ignores the key
    for path in (rep.output, rep.stock):
        got = _llama_logits(path, TOKENS, kv_overrides=dense)
        err = np.abs(got - want).max()
        assert err < 2e-3 * max(1.0, np.abs(want).max()), (path, err)
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_neurons_are_ranked_hot_to_cold_and_the_file_says_so(converted):
    from powerinfer_gguf.info import model_info

    res, rep = converted["gqa"]
    import gguf
    r = gguf.GGUFReader(rep.output)
    t = {x.name: np.array(x.data) for x in r.tensors}
    for il in range(res.hparams.n_layer):
        f = t[f"blk.{il}.pi_neuron_freq"]
        assert np.all(np.diff(f) <= 0) and f[0] > f[-1]
        assert t[f"blk.{il}.ffn_down_t.weight"].shape == (res.hparams.n_ff, res.hparams.n_embd)
    info = model_info(rep.output)["powerinfer"]
    assert info["powerinfer.sparse"] is True and info["powerinfer.ffn_down_layout"] == "neuron_rows"
    assert len(info["powerinfer.predictor.recall"]) == res.hparams.n_layer
    twin = model_info(rep.stock)
    assert "powerinfer.format_version" not in twin["powerinfer"] and "powerinfer.stock_twin" in twin["powerinfer"]
    assert not any(n.endswith("ffn_down_t.weight") for n in (x.name for x in gguf.GGUFReader(rep.stock).tensors))


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_predictor_recall_and_size(converted, name):
    res, rep = converted[name]
    for layer in rep.layers:
        assert layer.recall >= 0.99, layer
        assert layer.precision > 0.3, layer
    assert sum(l.predictor_bytes for l in rep.layers) <= 0.15 * rep.ffn_bytes


def test_silu_converts_dense_and_twin_matches(tmp_path):
    from powerinfer_gguf.convert import convert

    res = _synth(tmp_path, "s")
    hf = tmp_path / "s-hf"
    cfg = json.loads((hf / "config.json").read_text())
    cfg["hidden_act"] = "silu"
    (hf / "config.json").write_text(json.dumps(cfg))
    rep = convert(hf, tmp_path / "s.pi.gguf", outtype="f32", stock=tmp_path / "s.stock.gguf", progress=False,
                  log=lambda m: None)
    assert not rep.sparse and "dense only" in rep.summary()
    want = forward(gguf_weights(res.path), replace(res.hparams, act="silu"), np.array(TOKENS))
    for path in (rep.output, rep.stock):
        got = _llama_logits(path, TOKENS)
        assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("outtype,tol", [("f16", 0.05), ("bf16", 0.15)])
def test_half_precision_outputs_run_close(tmp_path, converted, outtype, tol):
    from powerinfer_gguf.convert import convert

    res, _ = converted["gqa"]
    rep = convert(res.path.parent / "gqa-hf", tmp_path / "h.gguf", outtype=outtype, calib_tokens=512,
                  progress=False, log=lambda m: None)
    got = _llama_logits(rep.output, TOKENS)
    want = forward(gguf_weights(res.path), res.hparams, np.array(TOKENS))
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    assert np.abs(got - want).max() < tol * max(1.0, np.abs(want).max())


# --- bad input: one line, no output ----------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "powerinfer_gguf", "convert", *args], capture_output=True, text=True)


def _broken(tmp_path, converted, how):
    res, _ = converted["gqa"]
    hf = tmp_path / "hf"
    shutil.copytree(res.path.parent / "gqa-hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    if how == "missing-key":
        del cfg["intermediate_size"]
    elif how == "unknown-act":
        cfg["hidden_act"] = "gelu_new_fancy"
    elif how == "arch":
        cfg["architectures"] = ["FalconForCausalLM"]
    elif how == "truncated":
        p = sorted(hf.glob("model-*.safetensors"))[-1]
        p.write_bytes(p.read_bytes()[:-1000])
    elif how == "no-tokenizer":
        (hf / "tokenizer.model").unlink()
    elif how == "shard-shape":
        # two shards with an index; one tensor stored with the wrong shape
        from safetensors.numpy import load_file, save_file
        st = {}
        for p in sorted(hf.glob("model-*.safetensors")):
            st.update(load_file(str(p)))
            p.unlink()
        names = sorted(st)
        half = len(names) // 2
        bad = "model.layers.1.mlp.up_proj.weight"
        st[bad] = st[bad][:-32]
        save_file({n: st[n] for n in names[:half]}, str(hf / "model-00001-of-00002.safetensors"))
        save_file({n: st[n] for n in names[half:]}, str(hf / "model-00002-of-00002.safetensors"))
        wm = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
              for i, n in enumerate(names)}
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    elif how == "bin-only":
        for i, p in enumerate(sorted(hf.glob("model-*.safetensors"))):
            p.rename(hf / f"pytorch_model-{i:05d}.bin")
        (hf / "model.safetensors.index.json").unlink()
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf


@pytest.mark.parametrize("how,msg", [
    ("missing-key", "missing key 'intermediate_size'"),
    ("unknown-act", "unknown activation 'gelu_new_fancy'"),
    ("arch", "unsupported architecture FalconForCausalLM"),
    ("truncated", "truncated"),
    ("no-tokenizer", "no tokenizer"),
    ("shard-shape", "shape mismatch: model.layers.1.mlp.up_proj.weight"),
    ("bin-only", "need torch"),
])
def test_bad_checkpoints_give_one_line_and_no_file(tmp_path, converted, how, msg):
    hf = _broken(tmp_path, converted, how)
    if how == "bin-only" and _has_torch():
        pytest.skip("torch is installed here: .bin checkpoints load")
    out = tmp_path / "out.gguf"
    r = _cli(str(hf), "-o", str(out), "--stock", str(tmp_path / "twin.gguf"), "--calib-tokens", "256")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert not list(tmp_path.glob("*.gguf*")), list(tmp_path.iterdir())


def _has_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def test_missing_folder(tmp_path):
    r = _cli(str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf"))
    assert r.returncode != 0 and not (tmp_path / "o.gguf").exists()
