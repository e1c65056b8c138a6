"""The patched libllama as llama-cpp-python loads it.

`import llama_cpp` loads the libllama that set-up copied into llama_cpp/lib (or the folder named by
LLAMA_CPP_LIB_PATH). Our patches add a small C API (include/llama-powerinfer.h, patches/0001); this
module reaches it through llama_cpp's own handle, without a second binding.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass


class NotPatchedError(RuntimeError):
    """The libllama that llama_cpp loaded is not ours (or not built from these patches/)."""


@dataclass(frozen=True)
class LibInfo:
    path: str
    api_version: int
    patch_series: str


def lib_info() -> LibInfo:
    """What the loaded libllama says of itself; NotPatchedError for a stock library."""
    import llama_cpp.llama_cpp as binding

    lib = binding._lib
    try:
        api = lib.llama_pi_api_version
        series = lib.llama_pi_patch_series
    except AttributeError:
        raise NotPatchedError(f"{lib._name} is a stock libllama (no llama_pi_api_version): "
                              "run `make setup` to install the patched build") from None
    api.restype, api.argtypes = ctypes.c_int32, []
    series.restype, series.argtypes = ctypes.c_char_p, []
    return LibInfo(lib._name, int(api()), series().decode())


def check_patched(expected_series: str | None = None) -> LibInfo:
    """Raise NotPatchedError unless the loaded lib is ours, built from ``expected_series``
    (default: the hash of this checkout's patches/)."""
    info = lib_info()
    if expected_series is None:
        from .build import patches_hash
        expected_series = patches_hash()
    if info.patch_series != expected_series:
        raise NotPatchedError(f"{info.path} was built from patch series {info.patch_series}, "
                              f"but patches/ is {expected_series}: run `make setup` again")
    return info
