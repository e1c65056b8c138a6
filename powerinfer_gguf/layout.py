"""Writing a GGUF of ours (docs/FORMAT.md): pi-convert and pi-synth both write through here.

A file is planned first (every tensor's name and numpy shape, in file order), its header written,
then tensors streamed one at a time in plan order, each checked against the plan. Our sparse
layout replaces a layer's ``ffn_down`` by its transposed rows and the layer's predictor and
firing frequencies (``sparse_plan``, ``put_sparse_ffn_down``); the neuron order of gate, up,
down_t, fc2, threshold and freq is the caller's (hot to cold).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import format as fmt

Plan = list[tuple[str, tuple[int, ...]]]

OUTTYPES = ("f32", "f16", "bf16")


def file_type(outtype: str):
    """llama.cpp's general.file_type for an outtype (q4_0/q8_0 files are made by llama-quantize)."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]


def storage(outtype: str, is_vector: bool):
    """(numpy dtype of the data, gguf raw type or None) of one stored tensor: vectors (norms,
    thresholds, frequencies) stay F32, as llama.cpp's converter keeps them; weights follow outtype."""
    import gguf

    if is_vector or outtype == "f32":
        return np.dtype(np.float32), None
    if outtype == "f16":
        return np.dtype(np.float16), None
    return np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16


def to_stored(a: np.ndarray, outtype: str) -> np.ndarray:
    import gguf

    dt, raw = storage(outtype, a.ndim == 1)
    if raw is None:
        return np.ascontiguousarray(a, dt)
    return gguf.quants.quantize(np.ascontiguousarray(a, np.float32), raw)


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
        self.done = 0

    def begin(self, plan: Plan) -> None:
        """Tensor infos and the header; keys must be added before."""
        self.plan = list(plan)
        for name, shape in self.plan:
            dt, raw = storage(self.outtype, len(shape) == 1)
            self.w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize, raw_dtype=raw)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()

    def put(self, name: str, a: np.ndarray) -> None:
        want = self.plan[self.done]
        if (name, tuple(a.shape)) != want:  # a writer bug, never user input: the file would be corrupt
            raise AssertionError(f"writing {name} {list(a.shape)}, the plan has {want[0]} {list(want[1])}")
        self.w.write_tensor_data(to_stored(a, self.outtype))
        self.done += 1

    def put_sparse_ffn_down(self, il: int, down: np.ndarray, fc1: np.ndarray, fc2: np.ndarray,
                            threshold: np.ndarray, freq: np.ndarray) -> None:
        """A layer's part of our layout that stands where ffn_down would: down [n_embd, n_ff]
        stored one row per neuron, then the predictor and frequencies, all in neuron order."""
        T = fmt.Tensors
        self.put(T.FFN_DOWN_T.format(il), np.ascontiguousarray(down.T))
        self.put(T.PRED_FC1.format(il), fc1)
        self.put(T.PRED_FC2.format(il), fc2)
        self.put(T.PRED_THRESHOLD.format(il), threshold)
        self.put(T.NEURON_FREQ.format(il), freq)

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
