"""`import llama_cpp` loads our patched libllama, built from this checkout's patches/."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_llama_cpp_loads_the_patched_lib():
    from powerinfer_gguf import build, runtime

    info = runtime.check_patched()
    assert info.api_version >= 1
    assert info.patch_series == build.patches_hash()
    import llama_cpp
    assert Path(info.path).resolve().parent == (Path(llama_cpp.__file__).parent / "lib").resolve()


def test_stale_series_is_reported():
    from powerinfer_gguf import runtime

    with pytest.raises(runtime.NotPatchedError, match="patch series"):
        runtime.check_patched("000000000000")


def test_light_import():
    """`import powerinfer_gguf` loads neither llama.cpp nor the converter's dependencies."""
    import subprocess
    import sys

    code = ("import sys, powerinfer_gguf, powerinfer_gguf.runtime; "
            "bad = [m for m in ('llama_cpp', 'sklearn', 'safetensors', 'gguf') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
