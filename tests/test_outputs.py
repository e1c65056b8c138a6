"""Nothing lost, errors early (issue 14 item 5): pi-synth and pi-convert refuse outputs that would
lose data before any slow work, write outputs whole or not at all (errors, SIGINT, SIGTERM), and
name bad inputs (Git LFS pointers, a missing shard, an impossible predictor rank) in one line."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def _run(cmd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "powerinfer_gguf", cmd, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r, *needles):
    """Exit 1 and a single stderr line (no progress bar: no slow work ran) holding every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _hf_copy(tiny_model, dest: Path) -> Path:
    _, hf = tiny_model
    shutil.copytree(hf, dest)
    return dest


SYNTH_FAST = ("--preset", "tiny", "--layers", "1", "--outtype", "f32", "--calib-tokens", "64", "--heldout-tokens", "64")


# --- pi-synth ---------------------------------------------------------------------------------

def test_synth_refuses_an_existing_hf_folder_and_keeps_it(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    before = _tree(d)
    r = _run("synth", tmp_path / "m.gguf", *SYNTH_FAST, "--hf", d)
    _one_line_error(r, str(d), "exists", "--force")
    r = _run("synth", tmp_path / "m.gguf", *SYNTH_FAST, "--hf", d, "--force")
    _one_line_error(r, "notes.txt", "did not write")
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_synth_output_inside_the_hf_folder_is_refused(tmp_path):
    d = tmp_path / "hf"
    r = _run("synth", d / "m.gguf", *SYNTH_FAST, "--hf", d)
    _one_line_error(r, "inside the output folder")
    assert not d.exists()


def test_synth_force_replaces_its_own_previous_outputs_only(tmp_path):
    d, out, pi = tmp_path / "hf", tmp_path / "m.gguf", tmp_path / "m.pi.gguf"
    (tmp_path / "hf.part").mkdir()  # a user's folder and file whose names our temporaries once had
    (tmp_path / "hf.part" / "keep").write_text("x")
    (tmp_path / "m.gguf.part").write_text("y")
    r = _run("synth", out, *SYNTH_FAST, "--hf", d, "--pi", pi)
    assert r.returncode == 0, r.stderr
    first = _tree(d)
    r = _run("synth", out, *SYNTH_FAST, "--hf", d, "--pi", pi, "--seed", "1")
    _one_line_error(r, "exists", "--force")
    r = _run("synth", out, *SYNTH_FAST, "--hf", d, "--pi", pi, "--seed", "1", "--force")
    assert r.returncode == 0, r.stderr
    second = _tree(d)
    assert second.keys() == first.keys() and second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.part", "m.gguf", "m.gguf.part", "m.pi.gguf"]
    assert (tmp_path / "hf.part" / "keep").read_text() == "x" and (tmp_path / "m.gguf.part").read_text() == "y"


def _fail_writing(monkeypatch, path_part: str, after: int):
    """Disk full (ENOSPC) on the ``after``-th tensor written to a GGUF whose path contains path_part."""
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    count = {"n": 0}

    def write_tensor_data(self, tensor, *a, **kw):
        if path_part in str(self.path):
            count["n"] += 1
            if count["n"] > after:
                raise OSError(28, "No space left on device")
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)


def test_synth_failure_keeps_an_existing_pi_file(tmp_path, monkeypatch):
    from dataclasses import replace

    from powerinfer_gguf.synth import hparams_for, synthesize

    out, pi = tmp_path / "m.gguf", tmp_path / "m.pi.gguf"
    pi.write_bytes(b"an earlier file")
    _fail_writing(monkeypatch, "m.pi.gguf", 5)
    with pytest.raises(OSError, match="No space"):
        synthesize(out, "tiny", outtype="f32", hparams=replace(hparams_for("tiny"), n_layer=1), pi_out=pi,
                   calib_tokens=64, heldout_tokens=64, force=True, progress=False)
    assert pi.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pi.gguf"]


# --- pi-convert -------------------------------------------------------------------------------

def test_convert_never_writes_over_its_inputs(tmp_path, tiny_model):
    hf = _hf_copy(tiny_model, tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[2]
    before = _tree(hf)
    for args in (("-o", shard), ("-o", shard, "--force"), ("-o", tmp_path / "o.gguf", "--stock", hf / "config.json"),
                 ("-o", hf / "tokenizer.model", "--force")):
        r = _run("convert", hf, *args)
        _one_line_error(r, "is an input")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)
    r = _run("convert", hf, "-o", calib, "--calib", calib, "--force")
    _one_line_error(r, "is an input")
    assert _tree(hf) == before and calib.read_text() == "some text " * 200


@pytest.mark.parametrize("how", ["missing", "a-file", "exists", "same"])
def test_convert_checks_outputs_before_profiling(tmp_path, tiny_model, how):
    _, hf = tiny_model
    (tmp_path / "f").write_text("x")
    out, extra = {"missing": (tmp_path / "nope" / "o.gguf", ()), "a-file": (tmp_path / "f" / "o.gguf", ()),
                  "exists": (tmp_path / "f", ()), "same": (tmp_path / "o.gguf", ("--stock", tmp_path / "o.gguf"))}[how]
    r = _run("convert", hf, "-o", out, *extra)
    _one_line_error(r, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_refuses_a_read_only_folder(tmp_path, tiny_model):
    _, hf = tiny_model
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = _run("convert", hf, "-o", ro / "o.gguf")
    _one_line_error(r, "not writable")


@pytest.mark.parametrize("when", ["writing", "closing"])
def test_twin_failure_leaves_the_earlier_output_and_no_twin(tmp_path, tiny_model, monkeypatch, when):
    """The twin fails (disk full) while its tensors are written or when its last bytes are
    flushed, after our file is complete: the earlier output stays, no new file, no temporary."""
    from powerinfer_gguf.convert import convert

    _, hf = tiny_model
    out, twin = tmp_path / "o.gguf", tmp_path / "twin.gguf"
    out.write_bytes(b"an earlier conversion")
    (tmp_path / "o.gguf.part").write_text("a user's file")
    if when == "writing":
        _fail_writing(monkeypatch, "twin.gguf", 10)
    else:
        _fail_closing(monkeypatch, "twin.gguf")
    with pytest.raises(OSError, match="No space"):
        convert(hf, out, outtype="f32", stock=twin, calib_tokens=256, force=True, progress=False, log=lambda m: None)
    assert out.read_bytes() == b"an earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "o.gguf.part"]


def _fail_closing(monkeypatch, path_part: str):
    """Disk full (ENOSPC) when a GGUF whose path contains path_part flushes and closes."""
    import gguf

    real = gguf.GGUFWriter.close

    def close(self):
        if path_part in str(self.path):
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(gguf.GGUFWriter, "close", close)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_convert_leaves_no_file(tmp_path, tiny_model, sig):
    """The signal comes while the outputs are being written (the process is stopped as soon as its
    first temporary file appears, signalled, and let go): no output, no temporary file."""
    _, hf = tiny_model
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(3):  # a loaded machine may run the whole write before the test stops it: again
        # a test run started in the background (`cmd &`) ignores SIGINT, and so would the child:
        # give it the default, as a terminal's program has
        p = subprocess.Popen([sys.executable, "-m", "powerinfer_gguf", "convert", str(hf), "-o", str(out / "o.gguf"),
                              "--stock", str(out / "t.gguf"), "--outtype", "bf16", "--calib-tokens", "256"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            _stop_when_a_file_appears(p, out)
            if (out / "o.gguf").exists() or (out / "t.gguf").exists():
                p.send_signal(signal.SIGCONT)
                p.communicate(timeout=120)
                for f in out.iterdir():  # this attempt's own outputs
                    f.unlink()
                continue
            p.send_signal(sig)
            p.send_signal(signal.SIGCONT)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode != 0, err
        assert "Traceback" not in err
        assert list(out.iterdir()) == []
        return
    pytest.fail("the conversion finished three times before it could be stopped mid-write")


def _stop_when_a_file_appears(p: subprocess.Popen, folder: Path) -> None:
    deadline = time.time() + 240
    while not list(folder.iterdir()) and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGSTOP)
    assert list(folder.iterdir()), "no temporary file appeared: " + (p.stderr.read() if p.poll() is not None else "")


# --- bad inputs ---------------------------------------------------------------------------------

LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123456\n".format("ab" * 32)


@pytest.mark.parametrize("which", ["shard", "tokenizer.model"])
def test_git_lfs_pointers_are_named(tmp_path, tiny_model, which):
    hf = _hf_copy(tiny_model, tmp_path / "hf")
    p = sorted(hf.glob("model-*.safetensors"))[1] if which == "shard" else hf / "tokenizer.model"
    p.write_text(LFS)
    r = _run("convert", hf, "-o", tmp_path / "o.gguf")
    _one_line_error(r, f"{p} is a Git LFS pointer, not the file: run git lfs pull")


def test_missing_shard_named_before_any_work(tmp_path, tiny_model):
    hf = _hf_copy(tiny_model, tmp_path / "hf")
    last = sorted(hf.glob("model-*.safetensors"))[-1]
    last.unlink()
    r = _run("convert", hf, "-o", tmp_path / "o.gguf")
    _one_line_error(r, "model.safetensors.index.json", f"shard {last.name} is missing")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("rank", ["0", "100000"])
def test_predictor_rank_out_of_range_is_refused(tmp_path, tiny_model, rank):
    res, hf = tiny_model
    top = min(res.hparams.n_embd, res.hparams.n_ff)
    r = _run("convert", hf, "-o", tmp_path / "o.gguf", "--predictor-rank", rank)
    _one_line_error(r, f"--predictor-rank {rank}", f"1 to {top}")


def test_bf16_checkpoint_converts_like_f32(tmp_path, tiny_model, tiny_pi):
    """A BF16 copy of the checkpoint (each tensor rounded to bfloat16) converts; its dense logits
    are those of the F32 conversion within bfloat16's precision."""
    import gguf
    from safetensors.numpy import load_file

    from powerinfer_gguf.convert import convert

    _, hf = tiny_model
    _, ours32, _ = tiny_pi
    bf = tmp_path / "bf16"
    bf.mkdir()
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bf / f.name)
            continue
        bits = {k: gguf.quants.quantize(v.astype(np.float32), gguf.GGMLQuantizationType.BF16).view(np.uint16)
                .reshape(v.shape) for k, v in load_file(str(f)).items()}
        _write_bf16_safetensors(bf / f.name, bits)
    rep = convert(bf, tmp_path / "bf.gguf", outtype="f32", calib_tokens=1536, progress=False, log=lambda m: None)
    tokens = [1, 15043, 3186, 29892, 445, 338, 263, 1243]
    got, want = _dense_logits(rep.output, tokens), _dense_logits(ours32, tokens)
    assert np.abs(got - want).max() < 0.05 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def _write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """BF16 tensors (given as their uint16 bits: numpy has no bfloat16) through the library's own
    low-level writer, which takes a dtype name and raw bytes."""
    from safetensors import TensorSpec, serialize_file

    tensors = {k: np.ascontiguousarray(v, np.uint16) for k, v in tensors.items()}  # alive while written
    serialize_file({k: TensorSpec(dtype="bfloat16", shape=v.shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
                    for k, v in tensors.items()}, str(path))


def _dense_logits(path, tokens):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
                          kv_overrides={"powerinfer.runtime.sparse": False})
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)])


def test_a_link_to_an_input_is_an_input(tmp_path):
    """Symbolic and hard links reach the input's bytes: writing over either would change it."""
    from powerinfer_gguf.outputs import OutputError, check_outputs

    inp = tmp_path / "shard.safetensors"
    inp.write_bytes(b"weights")
    os.link(inp, tmp_path / "hard")
    (tmp_path / "soft").symlink_to(inp)
    for out in ("hard", "soft"):
        with pytest.raises(OutputError, match="is an input"):
            check_outputs([tmp_path / out], [inp], force=True)
    with pytest.raises(OutputError, match="named as two outputs"):
        check_outputs([tmp_path / "a.gguf", tmp_path / "." / "a.gguf"], [])
    assert inp.read_bytes() == b"weights"
