"""Writing a GGUF of ours (docs/FORMAT.md): pi-convert and pi-synth both write through here.

A file is planned first (every tensor's name and numpy shape, in file order), its header written,
then tensors streamed one at a time in plan order, each checked against the plan. Our sparse
layout replaces a layer's ``ffn_down`` by its transposed rows and the layer's predictor and
firing frequencies (``sparse_plan``, ``put_sparse_ffn_down``); the neuron order of gate, up,
down_t, fc2, threshold and freq is the caller's (hot to cold).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import format as fmt

Plan = list[tuple[str, tuple[int, ...]]]

OUTTYPES = ("f32", "f16", "bf16")
QUANT_OUTTYPES = ("q4_0", "q8_0")  # written directly (pi-synth), as llama-quantize would write them
_CHUNK_VALUES = 1 << 22            # a thread's share of a tensor: rows of about this many values


def file_type(outtype: str):
    """llama.cpp's general.file_type for an outtype."""
    import gguf

    T = gguf.LlamaFileType
    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q4_0": T.MOSTLY_Q4_0,
            "q8_0": T.MOSTLY_Q8_0}[outtype]


def tensor_type(outtype: str, name: str, shape: tuple[int, ...]):
    """The gguf type a tensor is stored as: vectors (norms, thresholds, frequencies) F32, as
    llama.cpp's converter keeps them; weights follow outtype. Quantized outtypes follow
    llama-quantize's mix (output.weight Q6_K under Q4_0) and pi-quantize's predictor rule, so a
    pair written directly holds the types pi-quantize would give it."""
    import gguf

    from .quantize import predictor_qtype

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype in ("f16", "bf16"):
        return Q.F16 if outtype == "f16" else Q.BF16
    if fmt.Tensors.is_predictor(name):
        return Q[predictor_qtype(name, shape[-1], "auto").upper()]
    if name == "output.weight" and outtype == "q4_0" and shape[-1] % 256 == 0:
        return Q.Q6_K
    return Q[outtype.upper()]


def type_nbytes(qtype, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def stored(a: np.ndarray, qtype, rows: np.ndarray | None = None) -> np.ndarray:
    """The bytes of ``a`` as written: its rows (in ``rows`` order when given) as ``qtype``, a chunk
    of rows per thread (numpy's gathers and casts and ggml's quantizer release the GIL)."""
    import gguf

    from .quantize import quantize_rows

    Q = gguf.GGMLQuantizationType
    if a.ndim == 1:
        return np.ascontiguousarray(a if rows is None else a[rows], np.float32)
    n, k = a.shape
    cast = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
    out = np.empty((n, k) if cast else (n, type_nbytes(qtype, (k,))), cast or np.uint8)

    def chunk(s: int, e: int) -> None:
        src = a[s:e] if rows is None else a[rows[s:e]]
        if cast:
            out[s:e] = src
        elif qtype == Q.BF16:
            out[s:e] = gguf.quants.quantize(np.ascontiguousarray(src, np.float32), qtype).view(np.uint8)
        else:
            quantize_rows(src, qtype, out[s:e])

    for_row_chunks(n, max(1, _CHUNK_VALUES // k), chunk)
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` (a transposed view), a chunk of rows per thread."""
    out = np.empty(a.shape, a.dtype)

    def chunk(s: int, e: int) -> None:
        out[s:e] = a[s:e]

    for_row_chunks(a.shape[0], max(1, _CHUNK_VALUES // a.shape[1]), chunk)
    return out


def for_row_chunks(n: int, step: int, fn) -> None:
    """fn(start, end) over [0, n) in steps, on a thread per core; errors re-raised here."""
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, n, step)
    if len(starts) == 1:
        fn(0, n)
        return
    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 2)) as ex:
        for f in [ex.submit(fn, s, min(n, s + step)) for s in starts]:
            f.result()


def tensor_name(kind, il: int | None = None) -> str:
    """llama.cpp's name of a weight (a gguf.MODEL_TENSOR), as gguf-py spells it."""
    import gguf

    return gguf.TENSOR_NAMES[kind].format(bid=il) + ".weight"


def llama_layer_plan(hp, il: int) -> Plan:
    """Layer ``il`` of a LLaMA GGUF (hp: forward.Hparams) in llama.cpp's file order, numpy shapes."""
    import gguf

    T = gguf.MODEL_TENSOR
    d, f, dkv = hp.n_embd, hp.n_ff, hp.n_head_kv * hp.head_dim
    shapes = ((T.ATTN_NORM, (d,)), (T.ATTN_Q, (d, d)), (T.ATTN_K, (dkv, d)), (T.ATTN_V, (dkv, d)),
              (T.ATTN_OUT, (d, d)), (T.FFN_NORM, (d,)), (T.FFN_GATE, (f, d)), (T.FFN_UP, (f, d)),
              (T.FFN_DOWN, (d, f)))
    return [(tensor_name(kind, il), shape) for kind, shape in shapes]


def sparse_plan(dense: Iterable[tuple[str, tuple[int, ...]]], ranks: Sequence[int]) -> Plan:
    """Our layout of a dense plan: each layer's ffn_down [n_embd, n_ff] becomes down_t, the
    predictor (rank ``ranks[layer]``), threshold and freq, where ffn_down stood."""
    T = fmt.Tensors
    plan: Plan = []
    for name, shape in dense:
        if not name.endswith("ffn_down.weight"):
            plan.append((name, shape))
            continue
        il = int(name.split(".")[1])
        d, f = shape
        plan += [(T.FFN_DOWN_T.format(il), (f, d)), (T.PRED_FC1.format(il), (ranks[il], d)),
                 (T.PRED_FC2.format(il), (f, ranks[il])), (T.PRED_THRESHOLD.format(il), (f,)),
                 (T.NEURON_FREQ.format(il), (f,))]
    return plan


def write_sparse_keys(w, predictor_act: str, recall_target: float, recall: Sequence[float],
                      precision: Sequence[float], calib_tokens: int) -> None:
    """The powerinfer.* keys of a sparse file (after powerinfer.format_version)."""
    K = fmt.Keys
    w.add_bool(K.SPARSE, True)
    w.add_string(K.FFN_DOWN_LAYOUT, "neuron_rows")
    w.add_string(K.PREDICTOR_ACT, predictor_act)
    w.add_float32(K.PREDICTOR_RECALL_TARGET, recall_target)
    w.add_array(K.PREDICTOR_RECALL, [float(r) for r in recall])
    w.add_array(K.PREDICTOR_PRECISION, [float(p) for p in precision])
    w.add_uint32(K.CALIB_TOKENS, calib_tokens)


class GGUFOut:
    """One output GGUF at ``path`` (the caller's temporary name), streamed in plan order."""

    def __init__(self, path: Path, arch: str, outtype: str):
        import gguf

        self.w = gguf.GGUFWriter(path, arch)
        self.outtype = outtype
        self.plan: Plan = []
        self.types: list = []
        self.done = 0

    def begin(self, plan: Plan) -> None:
        """Tensor infos and the header; keys must be added before."""
        self.plan = list(plan)
        self.types = [tensor_type(self.outtype, name, shape) for name, shape in self.plan]
        for (name, shape), qtype in zip(self.plan, self.types):
            self.w.add_tensor_info(name, shape, np.dtype(np.float32), type_nbytes(qtype, shape), raw_dtype=qtype)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()

    def put(self, name: str, a: np.ndarray, rows: np.ndarray | None = None) -> None:
        """The next planned tensor: ``a``, or its rows in ``rows`` order."""
        want = self.plan[self.done]
        if (name, tuple(a.shape)) != want:  # a writer bug, never user input: the file would be corrupt
            raise AssertionError(f"writing {name} {list(a.shape)}, the plan has {want[0]} {list(want[1])}")
        self.w.write_tensor_data(stored(a, self.types[self.done], rows))
        self.done += 1

    def put_sparse_ffn_down(self, il: int, down: np.ndarray, fc1: np.ndarray, fc2: np.ndarray,
                            threshold: np.ndarray, freq: np.ndarray, order: np.ndarray | None = None) -> None:
        """A layer's part of our layout that stands where ffn_down would: down [n_embd, n_ff]
        stored one row per neuron, then the predictor and frequencies; neurons in ``order`` when
        given (down's columns, fc2's rows, threshold, freq), else as they come."""
        T = fmt.Tensors
        # gathering rows of a transposed view reads columns: 4x slower than transposing first
        self.put(T.FFN_DOWN_T.format(il), down.T if order is None else contiguous(down.T), order)
        self.put(T.PRED_FC1.format(il), fc1)
        for name, a in ((T.PRED_FC2, fc2), (T.PRED_THRESHOLD, threshold), (T.NEURON_FREQ, freq)):
            self.put(name.format(il), a, order)

    def close(self) -> None:
        if self.done != len(self.plan):
            raise AssertionError(f"{self.done} of {len(self.plan)} planned tensors written")
        self.w.close()

    def abandon(self) -> None:
        """Close the file without the checks (the caller removes it)."""
        try:
            self.w.close()
        except Exception:  # a half-written file may fail to flush: it is removed anyway
            pass
