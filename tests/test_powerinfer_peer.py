"""tools/powerinfer_peer.py (issue 19): our file in PowerInfer's format, its predictors deciding as
ours do, its GPU index as PowerInfer's solver means it."""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import powerinfer_peer as peer  # noqa: E402


@pytest.mark.parametrize("act", ["none", "relu"])
def test_mapped_predictor_decides_as_ours_at_the_calibrated_rms(act):
    """Exactly the same neurons where rms(x) is the one calibrated (the norm's weight folded in)."""
    from powerinfer_gguf.predictor import Predictor

    rng = np.random.default_rng(0)
    d, f, r = 64, 96, 8
    p = Predictor(rng.standard_normal((r, d)).astype(np.float32), rng.standard_normal((f, r)).astype(np.float32),
                  -np.abs(rng.standard_normal(f)).astype(np.float32) - 0.1, act)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    x = rng.standard_normal((200, d)).astype(np.float32)
    x *= 3.0 / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True))  # every token at rms 3
    fc1, fc2 = peer.peer_predictor(p.fc1, p.fc2, p.threshold, act, w, 3.0)
    assert fc1.shape == ((2 * r if act == "none" else r), d) and fc2.shape == (f, fc1.shape[0])
    ours = p.predict(x / 3.0 * w)
    assert 0.05 < ours.mean() < 0.95
    # equal but for decisions within float rounding of the margin
    assert (peer.peer_predict(fc1, fc2, x) == ours).mean() > 0.999


def test_thresholds_of_both_signs_are_refused():
    with pytest.raises(ValueError, match="every threshold negative"):
        peer.peer_predictor(np.ones((2, 4)), np.ones((3, 2)), np.array([-1.0, 0.5, -2.0]), "none", np.ones(4), 1.0)


@pytest.fixture(scope="module")
def synth_pi(tmp_path_factory):
    from dataclasses import replace

    from powerinfer_gguf.synth import hparams_for, synthesize

    d = tmp_path_factory.mktemp("peer")
    synthesize(d / "s.gguf", "tiny", outtype="f16", hparams=replace(hparams_for("tiny"), n_layer=2),
               pi_out=d / "p.gguf", progress=False)
    return d / "p.gguf"


def test_model_in_powerinfer_format(synth_pi, tmp_path):
    """PWRI magic, PowerInfer's tensor names and shapes, its threshold key, none of ours left; the
    peer's choices agree with ours on calibration text."""
    maps, report = peer.calibrate(str(synth_pi), 128)
    assert all(agree > 0.98 and abs(r_o - r_p) < 0.02 for _, agree, r_o, r_p, *_ in report), report
    out = tmp_path / "m.powerinfer.gguf"
    peer.write_model(str(synth_pi), out, maps)
    assert out.read_bytes()[:4] == b"PWRI"
    src = {t.name: t for t in gguf.GGUFReader(synth_pi).tensors}
    raw = bytearray(out.read_bytes())
    raw[:4] = b"GGUF"  # gguf-py reads it once the magic is GGUF's again
    back = tmp_path / "back.gguf"
    back.write_bytes(raw)
    r = gguf.GGUFReader(back)
    names = {t.name: t for t in r.tensors}
    assert not any("pi_" in n for n in names) and not any(k.startswith("powerinfer.") and k != "powerinfer.sparse_threshold"
                                                         for k in r.fields)
    assert r.fields["powerinfer.sparse_threshold"].contents() == pytest.approx(-1.0)
    for il in range(2):
        rank = src[f"blk.{il}.pi_pred_fc1.weight"].shape[1]  # gguf-py: ne order
        assert list(names[f"blk.{il}.fc1.weight"].shape) == [256, 2 * rank]
        assert list(names[f"blk.{il}.fc2.weight"].shape) == [2 * rank, 704]
        assert names[f"blk.{il}.fc1.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        down = f"blk.{il}.ffn_down_t.weight"
        assert np.array_equal(np.asarray(names[down].data), np.asarray(src[down].data))


def test_gpuidx_takes_the_hottest_batches(synth_pi, tmp_path):
    out = tmp_path / "m.gguf.generated.gpuidx"
    counts = peer.write_gpuidx(str(synth_pi), out, neurons=600, vram_capacity=123, batch=128)
    assert sum(counts) == 512 and all(c % 128 == 0 for c in counts)  # whole batches within the capacity
    raw = bytearray(out.read_bytes())
    assert raw[:4] == b"PWRI"
    raw[:4] = b"GGUF"
    (tmp_path / "i.gguf").write_bytes(raw)
    r = gguf.GGUFReader(tmp_path / "i.gguf")
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    for il, k in enumerate(counts):
        assert t[f"blk.{il}.gpu_idx"].sum() == k and t[f"blk.{il}.gpu_idx"][:k].all()
        assert list(t[f"blk.{il}.gpu_bucket"]) == list(range(k))
    assert r.fields["split.vram_capacity"].contents() == 123
