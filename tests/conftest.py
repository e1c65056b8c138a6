"""Shared fixtures: small models made on the fly (once per session)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny synthetic ReLU LLaMA (GQA, 4 layers) as F32 GGUF plus its HF checkpoint."""
    from powerinfer_gguf.synth import synthesize

    d = tmp_path_factory.mktemp("tiny")
    res = synthesize(d / "tiny.gguf", "tiny", outtype="f32", hf_dir=d / "hf", progress=False)
    return res, d / "hf"


@pytest.fixture(scope="session")
def tiny_pi(tiny_model, tmp_path_factory):
    """The tiny model through pi-convert (F32): our sparse GGUF and its stock twin."""
    from powerinfer_gguf.convert import convert

    res, hf = tiny_model
    d = tmp_path_factory.mktemp("tiny-pi")
    ours, twin = d / "tiny.pi.gguf", d / "tiny.stock.gguf"
    convert(hf, ours, outtype="f32", stock=twin, calib_tokens=1536, progress=False, log=lambda m: None)
    return res, ours, twin
