"""The names our Python writes (format.Keys, format.Tensors) are the names llama.cpp reads: the C
side's strings, read from every patch (its added lines) and every file under csrc/ (our own C/C++
sources, where they exist)."""
from __future__ import annotations

import re

from conftest import c_sources
from powerinfer_gguf import format as fmt

# Keys only Python reads (pi-bench, pi-info, provenance): llama.cpp never looks at them.
PYTHON_ONLY = {fmt.Keys.PREDICTOR_RECALL_TARGET, fmt.Keys.CALIB_TOKENS, fmt.Keys.STOCK_TWIN}

_KEY = re.compile(r'"(' + re.escape(fmt.NAMESPACE) + r'\.[a-z0-9_.]+)"')
_TENSOR = re.compile(r'\{\s*LLM_TENSOR_PI_\w+\s*,\s*"([^"]+)"\s*\}')  # our rows of llama-arch's name table


def _names(cls) -> set[str]:
    return {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}


def python_keys_c_reads() -> set[str]:
    return (_names(fmt.Keys) | _names(fmt.Keys.Runtime)) - PYTHON_ONLY


def python_tensors() -> set[str]:
    """format.Tensors as llama-arch writes them: "blk.%d.NAME" (no ".weight": the loader adds it)."""
    return {v.replace("{}", "%d").removesuffix(".weight") for v in _names(fmt.Tensors)}


def test_c_sources_are_found():
    names = [n for n, _ in c_sources()]
    assert len([n for n in names if n.endswith(".patch")]) >= 1


def test_keys_are_the_same_on_both_sides():
    c = {m for _, text in c_sources() for m in _KEY.findall(text)}
    py = python_keys_c_reads()
    assert c - py == set(), "llama.cpp reads keys format.Keys does not name"
    assert py - c == set(), "format.Keys names keys llama.cpp never reads (add them to PYTHON_ONLY if so meant)"


def upstream_tensors() -> set[str]:
    """llama.cpp's own tensor names, as gguf-py lists them, in the same spelling."""
    import gguf

    return {v.replace("{bid}", "%d") for v in gguf.TENSOR_NAMES.values()}


def test_tensor_names_are_the_same_on_both_sides():
    """Our rows of llama.cpp's tensor name table: each is a format.Tensors name or one of
    llama.cpp's own (the split parts of ffn_gate/ffn_up read the upstream tensors); every
    format.Tensors name is there."""
    c = {m for _, text in c_sources() for m in _TENSOR.findall(text)}
    ours = python_tensors()
    assert ours <= c, "format.Tensors names tensors llama.cpp does not know"
    assert c - ours <= upstream_tensors(), "llama.cpp reads tensors of ours that format.Tensors does not name"
    assert not ours & upstream_tensors()


def test_python_only_keys_are_ours():
    assert PYTHON_ONLY <= _names(fmt.Keys)
