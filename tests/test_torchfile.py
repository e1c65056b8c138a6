"""torch.save'd state dicts read without torch; hostile pickles refused; PowerInfer predictors import."""
from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

# Writes a state dict in torch.save's zip layout without torch: stand-in torch modules give the
# pickle the same globals (torch._utils._rebuild_tensor_v2, torch.FloatStorage...) and persistent
# storage ids that torch writes. Run in a subprocess so that the stand-ins never meet real code.
_WRITER = r"""
import collections, pickle, sys, types, zipfile, numpy as np
torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
def _rebuild_tensor_v2(*a): pass
_rebuild_tensor_v2.__module__ = "torch._utils"; utils._rebuild_tensor_v2 = _rebuild_tensor_v2
kinds = {}
for name, dt in (("FloatStorage", np.float32), ("HalfStorage", np.float16)):
    cls = type(name, (), {}); cls.__module__ = "torch"; setattr(torch, name, cls); kinds[np.dtype(dt)] = cls
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
class P:
    def __init__(self, pid): self.pid = pid
class T:
    def __init__(self, key, arr): self.key, self.arr = key, arr
    def __reduce__(self):
        a = self.arr
        return (_rebuild_tensor_v2, (P(("storage", kinds[a.dtype], self.key, "cpu", a.size)), 0, a.shape,
                tuple(s // a.itemsize for s in a.strides), False, collections.OrderedDict()))
class W(pickle.Pickler):
    def persistent_id(self, obj): return obj.pid if isinstance(obj, P) else None
def save(path, sd):
    import io
    buf = io.BytesIO()
    W(buf, protocol=2).dump({k: T(str(i), np.ascontiguousarray(v)) for i, (k, v) in enumerate(sd.items())})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for i, v in enumerate(sd.values()):
            z.writestr(f"archive/data/{i}", np.ascontiguousarray(v).tobytes())
data = np.load(sys.argv[2])
save(sys.argv[1], {k.replace("__", "."): data[k] for k in data.files})
"""


def torch_save(path, sd: dict[str, np.ndarray]) -> None:
    npz = str(path) + ".npz"
    np.savez(npz, **{k.replace(".", "__"): v for k, v in sd.items()})
    r = subprocess.run([sys.executable, "-c", _WRITER, str(path), npz], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_roundtrip(tmp_path):
    from powerinfer_gguf.torchfile import load_state_dict

    rng = np.random.default_rng(0)
    sd = {"fc1.weight": rng.standard_normal((8, 16)).astype(np.float32),
          "fc2.weight": rng.standard_normal((32, 8)).astype(np.float16)}
    torch_save(tmp_path / "m.pt", sd)
    back = load_state_dict(tmp_path / "m.pt")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_hostile_pickle_is_refused(tmp_path):
    from powerinfer_gguf.torchfile import load_state_dict

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))  # any callable: a real attack would name os.system
    with zipfile.ZipFile(tmp_path / "e.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load .*print"):
        load_state_dict(tmp_path / "e.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="not a PyTorch zip"):
        load_state_dict(tmp_path / "junk.pt")


def test_powerinfer_predictor_dir_imports(tmp_path):
    """A PowerInfer predictor folder (model_N.pt with fc1/fc2) becomes the file's predictors,
    permuted with the neurons; the model still computes what it did."""
    import gguf

    from powerinfer_gguf.convert import convert
    from powerinfer_gguf.synth import hparams_for, synthesize
    from dataclasses import replace

    hp = replace(hparams_for("tiny"), n_layer=2)
    res = synthesize(tmp_path / "m.gguf", "tiny", outtype="f32", hparams=hp, hf_dir=tmp_path / "hf", progress=False)
    rng = np.random.default_rng(1)
    pdir = tmp_path / "pred"
    pdir.mkdir()
    fc2s = []
    for il in range(2):
        fc2 = rng.standard_normal((hp.n_ff, 24)).astype(np.float16)
        fc2s.append(fc2)
        torch_save(pdir / f"model_{il}.pt", {"fc1.weight": rng.standard_normal((24, hp.n_embd)).astype(np.float16),
                                             "fc2.weight": fc2})
    rep = convert(tmp_path / "hf", tmp_path / "o.gguf", outtype="f32", calib_tokens=512, predictor_dir=pdir,
                  progress=False, log=lambda m: None)
    r = gguf.GGUFReader(rep.output)
    assert r.fields["powerinfer.predictor.act"].contents() == "relu"
    t = {x.name: np.array(x.data) for x in r.tensors}
    got = t["blk.1.pi_pred_fc2.weight"]
    assert got.shape == (hp.n_ff, 24)
    # the same rows, in the file's hot-to-cold neuron order
    assert sorted(map(tuple, got.round(3))) == sorted(map(tuple, fc2s[1].astype(np.float32).round(3)))
    assert rep.layers[0].rank == 24
    # wrong shapes are named
    torch_save(pdir / "model_1.pt", {"fc1.weight": np.zeros((24, 7), np.float32), "fc2.weight": fc2s[1]})
    with pytest.raises(ValueError, match="do not fit"):
        convert(tmp_path / "hf", tmp_path / "o2.gguf", calib_tokens=512, predictor_dir=pdir, progress=False,
                log=lambda m: None)
    assert not (tmp_path / "o2.gguf").exists()


def test_pytorch_model_bin_converts_without_torch(tmp_path):
    """An HF folder with pytorch_model.bin (zip format) converts to the same file as its safetensors twin."""
    import gguf
    import shutil
    from dataclasses import replace

    from powerinfer_gguf.convert import convert
    from powerinfer_gguf.hf import Checkpoint
    from powerinfer_gguf.synth import hparams_for, synthesize

    hp = replace(hparams_for("tiny"), n_layer=2)
    synthesize(tmp_path / "m.gguf", "tiny", outtype="f32", hparams=hp, hf_dir=tmp_path / "hf", progress=False)
    ck = Checkpoint(tmp_path / "hf")
    binf = tmp_path / "hfbin"
    binf.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tmp_path / "hf" / f, binf / f)
    torch_save(binf / "pytorch_model.bin", {n: ck.get(n) for n in ck.names()})
    a = convert(tmp_path / "hf", tmp_path / "a.gguf", outtype="f32", calib_tokens=512, progress=False, log=lambda m: None)
    b = convert(binf, tmp_path / "b.gguf", outtype="f32", calib_tokens=512, progress=False, log=lambda m: None)
    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(a.output).tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(b.output).tensors}
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
