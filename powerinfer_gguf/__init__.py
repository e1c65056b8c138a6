"""powerinfer_gguf: PowerInfer-style activation-sparse inference on a patched llama.cpp.

Importing the package is light: it loads neither llama.cpp nor the converter's dependencies.
"""
__version__ = "0.1.0"
