"""powerinfer_gguf: PowerInfer-style activation-sparse inference on a patched llama.cpp.

Importing the package is light: it loads neither llama.cpp nor the converter's dependencies.
`from powerinfer_gguf import Llama` loads llama_cpp (our patched build) on first use.
"""
__version__ = "0.1.0"

_lazy = {}


def __getattr__(name):
    if name == "Llama":
        if name not in _lazy:
            from .runtime import _make_llama_class
            _lazy[name] = _make_llama_class()
        return _lazy[name]
    if name == "LayerStats":
        from .runtime import LayerStats
        return LayerStats
    raise AttributeError(f"module 'powerinfer_gguf' has no attribute {name!r}")
