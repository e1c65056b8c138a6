"""pi-quantize: a GGUF of F32/F16/BF16 weights (ours, or its stock twin) to Q4_0, Q8_0 or Q4_K
through llama.cpp's own quantizer (llama-quantize of the patched build), keeping what makes ours
ours: every ``powerinfer.*`` key, the row-per-neuron down (quantized along its rows, as the
sparse op reads it) and the predictors at ``predictor_type``: they choose which rows are read and
are read whole every token; Q8_0 keeps their recall to 4 digits at half F16's bytes (docs/NOTES.md,
"predictor precision"), so ``auto`` takes it wherever a tensor's rows divide into its 32-value
blocks, F16 elsewhere. A stock twin is quantized the same way, tensor for tensor.

Every check runs before the quantizer starts; the output appears whole or not at all.

``quantize_rows`` is the same quantizer in process (ggml's ``ggml_quantize_chunk``), for writers
that stream quantized tensors themselves (pi-synth's Q4_0/Q8_0 pairs, layer by layer).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import format as fmt
from .outputs import check_outputs, staged

# our name -> (llama-quantize's type, block width along a row); q4_k is llama.cpp's Q4_K_M mix
TYPES = {"q4_0": ("Q4_0", 32), "q8_0": ("Q8_0", 32), "q4_k": ("Q4_K_M", 256)}
PREDICTOR_TYPES = ("auto", "q8_0", "f16")
_FLOAT_TYPES = ("F32", "F16", "BF16")


class QuantizeError(ValueError):
    """Input that pi-quantize refuses; the message names the problem in one line."""


@dataclass
class QuantizeResult:
    src: Path
    out: Path
    qtype: str
    ours: bool               # a powerinfer file (else a stock GGUF)
    predictor_types: dict[str, str]  # our predictor tensors: type written
    n_quantized: int         # tensors the quantizer converted
    bytes_in: int
    bytes_out: int
    seconds: float

    def summary(self) -> str:
        kinds = sorted(set(self.predictor_types.values()))
        kind = f"ours, predictors {'/'.join(kinds) or 'none'}" if self.ours else "stock"
        return (f"wrote {self.out} ({self.qtype}, {kind}): {self.n_quantized} tensors quantized, "
                f"{self.bytes_in / 2**30:.2f} -> {self.bytes_out / 2**30:.2f} GiB in {self.seconds:.1f} s")


def _quantized_by_llama(name: str, n_dims: int) -> bool:
    """The tensors llama-quantize converts (llama_model_quantize_impl): 2-D+ weights, not norms."""
    return name.endswith("weight") and n_dims >= 2 and not name.endswith("_norm.weight")


def predictor_qtype(name: str, row: int, choice: str) -> str:
    """The type a predictor weight with rows of ``row`` values gets under --predictor-type."""
    if choice == "f16" or (choice == "auto" and row % 32):
        return "f16"
    if row % 32:
        raise QuantizeError(f"{name} has rows of {row} values, not a multiple of q8_0's 32-value blocks: "
                            f"use --predictor-type f16 or auto")
    return "q8_0"


def _check_source(src: Path, qtype: str, predictor_type: str) -> tuple[bool, int, dict[str, str]]:
    """Reads the header; refuses what the quantizer would fail on or silently change. Returns
    (ours, tensors to quantize, our predictor tensors with the type each gets)."""
    import gguf

    if qtype not in TYPES:
        raise QuantizeError(f"unsupported type {qtype!r}: choose one of {', '.join(TYPES)}")
    if predictor_type not in PREDICTOR_TYPES:
        raise QuantizeError(f"unsupported predictor type {predictor_type!r}: choose one of {', '.join(PREDICTOR_TYPES)}")
    if not src.is_file():
        raise QuantizeError(f"{src}: no such file")
    try:
        r = gguf.GGUFReader(src)
    except Exception as e:  # noqa: BLE001 - any parse failure is "not a GGUF" to the user
        raise QuantizeError(f"{src}: not a readable GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    ours = fmt.Keys.SPARSE in r.fields
    block = TYPES[qtype][1]
    n = 0
    predictors: dict[str, str] = {}
    for t in r.tensors:
        if not _quantized_by_llama(t.name, len(t.shape)):
            continue
        if t.tensor_type.name not in _FLOAT_TYPES:
            raise QuantizeError(f"{src}: {t.name} is already {t.tensor_type.name}: pi-quantize reads F32/F16/BF16 files")
        if ours and fmt.Tensors.is_predictor(t.name):
            predictors[t.name] = predictor_qtype(f"{src}: {t.name}", int(t.shape[0]), predictor_type)
            continue
        if int(t.shape[0]) % block:
            raise QuantizeError(f"{src}: {t.name} has rows of {int(t.shape[0])} values, not a multiple of "
                                f"{qtype}'s {block}-value blocks")
        n += 1
    return ours, n, predictors


def _keys(path: Path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("powerinfer.")}


def _verify(src: Path, out: Path, ours: bool, predictors: dict[str, str]) -> None:
    """What the quantizer wrote keeps our keys and predictors as asked."""
    import gguf

    if ours and _keys(out) != _keys(src):
        raise RuntimeError("llama-quantize changed the powerinfer.* keys")
    for t in gguf.GGUFReader(out).tensors:
        want = predictors.get(t.name, "").upper()
        if want and t.tensor_type.name != want:
            raise RuntimeError(f"llama-quantize wrote {t.name} as {t.tensor_type.name}, not {want}")


def llama_quantize(quantize_bin: Path, src: Path, dst: Path, llama_type: str, threads: int | None = None,
                   options: tuple[str, ...] = ()) -> None:
    """llama-quantize src -> dst (the caller's temporary file); a failure raises its last line."""
    cmd = [str(quantize_bin), *options, str(src), str(dst), llama_type, str(threads or os.cpu_count() or 2)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"llama-quantize {llama_type} failed: {tail[0]}")


def _run_quantizer(src: Path, tmp: Path, types_file: Path, qtype: str, predictors: dict[str, str],
                   threads: int | None) -> None:
    """The patched build's llama-quantize, told each predictor's type by exact name (its
    --tensor-type-file holds regular expressions, hence the escapes and anchors)."""
    from .build import bin_path

    options: tuple[str, ...] = ()
    if predictors:
        types_file.write_text("\n".join(f"^{re.escape(n)}$={t}" for n, t in predictors.items()) + "\n")
        options = ("--tensor-type-file", str(types_file))
    llama_quantize(bin_path("patched", "llama-quantize"), src, tmp, TYPES[qtype][0], threads, options)


def quantize(src, out, qtype: str, *, predictor_type: str = "auto", threads: int | None = None,
             force: bool = False) -> QuantizeResult:
    """``src`` quantized to ``qtype`` at ``out`` (replaced only with ``force``)."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    ours, n, predictors = _check_source(src, qtype, predictor_type)
    check_outputs([out], [src], force=force)
    with staged() as st:
        tmp = st.file(out)
        _run_quantizer(src, tmp, st.temp(out), qtype, predictors, threads)
        _verify(src, tmp, ours, predictors)
        st.commit()
    return QuantizeResult(src, out, qtype, ours, predictors, n,
                          src.stat().st_size, out.stat().st_size, time.time() - t0)


@functools.lru_cache(maxsize=1)
def _ggml_quantize_chunk():
    """ggml_quantize_chunk of the patched build's libggml-base: the code llama-quantize runs (2.7x
    gguf-py's numpy Q4_0 on one thread, and it releases the GIL, so writers quantize in threads)."""
    from .build import bin_path

    fn = ctypes.CDLL(str(bin_path("patched", "libggml-base.so"))).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    return fn


def quantize_rows(rows: np.ndarray, qtype, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [n, k] (float32) as ``qtype`` (a gguf.GGMLQuantizationType): uint8 [n, row bytes],
    into ``out`` when given (a C-contiguous block of that shape)."""
    import gguf

    a = np.ascontiguousarray(rows, np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = a.shape
    if k % block:
        raise ValueError(f"rows of {k} values do not divide into {qtype.name}'s {block}-value blocks")
    if out is None:
        out = np.empty((n, k // block * size), np.uint8)
    if out.shape != (n, k // block * size) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"quantize_rows: out must be uint8 [{n}, {k // block * size}], contiguous")
    _ggml_quantize_chunk()(int(qtype), a.ctypes.data, out.ctypes.data, 0, n, k, None)
    return out
