"""pi-quantize (issue 16): our file and its stock twin through llama.cpp's quantizer, our keys,
layout and predictors kept; the quantized file runs sparse and matches its own dense path with
every neuron active; bad input is refused in one line before the quantizer runs."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import TOKENS, assert_one_line_error, eval_logits, run_cli
from powerinfer_gguf.quantize import quantize


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _pi_keys(path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("powerinfer.")}


@pytest.mark.parametrize("qtype, row_type", [("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("q4_k", None)])
def test_ours_quantized_keeps_keys_and_runs(tiny_pi, tmp_path, qtype, row_type):
    _, ours, _ = tiny_pi
    out = tmp_path / f"t.{qtype}.gguf"
    res = quantize(ours, out, qtype)
    types = _types(out)
    assert res.ours and res.n_quantized > 0
    assert _pi_keys(out) == _pi_keys(ours)
    # predictors: q8_0 where their rows divide into 32-value blocks (auto), each as reported
    assert res.predictor_types and all(types[n] == t.upper() for n, t in res.predictor_types.items())
    assert all(types[n] == ("Q8_0" if r % 32 == 0 else "F16") for n, r in
               ((t.name, int(t.shape[0])) for t in gguf.GGUFReader(ours).tensors if "pi_pred_fc" in t.name))
    rows = [types[f"blk.{i}.{w}.weight"] for i in range(4) for w in ("ffn_gate", "ffn_up", "ffn_down_t")]
    if row_type:
        assert set(rows) == {row_type}
    else:  # llama.cpp's Q4_K_M: Q4_K rows, Q6_K for some layers' down
        assert set(rows) <= {"Q4_K", "Q6_K"} and "Q4_K" in rows
    assert types["blk.0.pi_pred_threshold"] == "F32" and types["blk.0.pi_neuron_freq"] == "F32"
    dense, _ = eval_logits(out, TOKENS[:8], one_by_one=True, sparse=False)
    full, llm = eval_logits(out, TOKENS[:8], one_by_one=True, all_active=True)
    assert llm.sparse_mode == "sparse"
    # both read the same quantized rows, x quantized alike for the dot products; sums differ in order
    assert np.abs(full - dense).max() < 1e-2 * max(1.0, np.abs(dense).max())
    assert (full.argmax(-1) == dense.argmax(-1)).mean() >= 0.85
    sparse, _ = eval_logits(out, TOKENS[:8], one_by_one=True)
    assert np.isfinite(sparse).all()


def test_twin_quantized_the_same_way(tiny_pi, tmp_path):
    """The stock twin's tensors get the types ours get (down: ffn_down vs our ffn_down_t)."""
    _, ours, twin = tiny_pi
    quantize(ours, tmp_path / "o.gguf", "q4_0")
    res = quantize(twin, tmp_path / "s.gguf", "q4_0")
    assert not res.ours and not res.predictor_types
    t_ours, t_twin = _types(tmp_path / "o.gguf"), _types(tmp_path / "s.gguf")
    for name, t in t_twin.items():
        assert t_ours[name.replace("ffn_down.", "ffn_down_t.")] == t, name


def test_cli_writes_and_refuses_to_overwrite(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    out = tmp_path / "cli.gguf"
    r = run_cli("quantize", ours, out, "--int4")
    assert r.returncode == 0 and "q4_0" in r.stdout, r.stderr[-2000:]
    before = out.read_bytes()
    r = run_cli("quantize", ours, out, "--type", "q8_0")
    assert_one_line_error(r, "exists")
    assert out.read_bytes() == before
    r = run_cli("quantize", ours, out, "--type", "q8_0", "--force")
    assert r.returncode == 0 and _types(out)["blk.0.ffn_gate.weight"] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.gguf"]  # no temporary left


@pytest.mark.parametrize("args, fragment", [
    (["--type", "q5_1"], "unsupported type 'q5_1'"),
    (["--int4", "--type", "q8_0"], "--int4 is q4_0"),
    ([], "give --int4 or --type"),
    (["--int4", "--predictor-type", "q4_0"], "unsupported predictor type"),
])
def test_cli_bad_options(tiny_pi, tmp_path, args, fragment):
    _, ours, _ = tiny_pi
    r = run_cli("quantize", ours, tmp_path / "x.gguf", *args)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "x.gguf").exists()


def test_bad_inputs_named(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    assert_one_line_error(run_cli("quantize", tmp_path / "none.gguf", tmp_path / "x.gguf", "--int4"), "no such file")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    assert_one_line_error(run_cli("quantize", junk, tmp_path / "x.gguf", "--int4"), "not a readable GGUF")
    # the twin's down has rows of n_ff = 704 values: no 256-value K-quant blocks
    assert_one_line_error(run_cli("quantize", twin, tmp_path / "x.gguf", "--type", "q4_k"),
                          "not a multiple of q4_k's 256-value blocks")
    q = tmp_path / "q.gguf"
    quantize(ours, q, "q8_0")
    assert_one_line_error(run_cli("quantize", q, tmp_path / "x.gguf", "--int4"), "already Q8_0")
    assert_one_line_error(run_cli("quantize", ours, ours, "--int4", "--force"), "is an input of this command")
    assert not (tmp_path / "x.gguf").exists()
