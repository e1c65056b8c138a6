"""Hugging Face checkpoint conventions: tensor names, the Q/K RoPE permutation, tokenizer.model.

llama.cpp's RoPE (type NORM) rotates adjacent pairs of a head; HF LLaMA rotates the two halves.
llama.cpp's converter reorders the rows of Q and K accordingly (``permute_qk_to_gguf``); the
synthetic generator writes HF checkpoints with the inverse.

``tokenizer.model`` is a SentencePiece ModelProto (protobuf). The fields we need are few and
stable, so they are encoded and decoded here directly instead of depending on protobuf.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.ffn_gate.weight`` -> ``model.layers.3.mlp.gate_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no HF name for tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def permute_qk_to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate halves) row order -> llama.cpp (rotate adjacent pairs) row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk_to_gguf`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- SentencePiece ModelProto -------------------------------------------------------------------
# Piece types are numbered alike in SentencePiece and GGUF (tokenizer.ggml.token_type):
# 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


@dataclass
class SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 2          # 1 unigram, 2 BPE (LLaMA's)
    byte_fallback: bool = True
    add_dummy_prefix: bool = True
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1

    def encode(self) -> bytes:
        out = bytearray()
        for p, s, t in zip(self.pieces, self.scores, self.types):
            msg = _field(1, 2, p.encode("utf-8")) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(t))
            out += _field(1, 2, msg)
        trainer = (_field(3, 0, _varint(self.model_type)) + _field(4, 0, _varint(len(self.pieces)))
                   + _field(35, 0, _varint(int(self.byte_fallback))) + _field(40, 0, _varint(self.unk_id))
                   + _field(41, 0, _varint(self.bos_id)) + _field(42, 0, _varint(self.eos_id))
                   + _field(43, 0, _varint(self.pad_id)))
        normalizer = (_field(1, 2, b"identity") + _field(3, 0, _varint(int(self.add_dummy_prefix)))
                      + _field(4, 0, _varint(0)) + _field(5, 0, _varint(1)))
        out += _field(2, 2, trainer) + _field(3, 2, normalizer)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> "SentencePieceModel":
        m = cls([], [], [])
        for num, wire, val in _fields(data):
            if num == 1 and wire == 2:
                piece, score, typ = "", 0.0, 1
                for n2, w2, v2 in _fields(val):
                    if n2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif n2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif n2 == 3 and w2 == 0:
                        typ = v2
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(typ)
            elif num == 2 and wire == 2:
                for n2, w2, v2 in _fields(val):
                    if w2 != 0:
                        continue
                    signed = v2 - (1 << 64) if v2 >= 1 << 63 else v2
                    if n2 == 3:
                        m.model_type = v2
                    elif n2 == 35:
                        m.byte_fallback = bool(v2)
                    elif n2 in (40, 41, 42, 43):
                        setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[n2], signed)
            elif num == 3 and wire == 2:
                for n2, w2, v2 in _fields(val):
                    if n2 == 3 and w2 == 0:
                        m.add_dummy_prefix = bool(v2)
        if not m.pieces:
            raise ValueError("not a SentencePiece model: no pieces")
        return m


def _fields(data: bytes):
    """Yield (field number, wire type, value) of a protobuf message; raise ValueError if corrupt."""
    i, n = 0, len(data)

    def varint() -> int:
        nonlocal i
        shift = val = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("corrupt protobuf: truncated varint")
            b = data[i]
            i += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return val

    while i < n:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, wire, varint()
        elif wire == 1:
            if i + 8 > n:
                raise ValueError("corrupt protobuf: truncated fixed64")
            yield num, wire, data[i:i + 8]
            i += 8
        elif wire == 2:
            ln = varint()
            if i + ln > n:
                raise ValueError("corrupt protobuf: truncated field")
            yield num, wire, data[i:i + ln]
            i += ln
        elif wire == 5:
            if i + 4 > n:
                raise ValueError("corrupt protobuf: truncated fixed32")
            yield num, wire, data[i:i + 4]
            i += 4
        else:
            raise ValueError(f"corrupt protobuf: wire type {wire}")


def write_sentencepiece_model(vocab_gguf: Path, dest: Path) -> None:
    """tokenizer.model from a llama.cpp vocab GGUF of an SPM tokenizer (tokens, scores, types)."""
    import gguf

    r = gguf.GGUFReader(vocab_gguf)
    f = r.fields
    if f["tokenizer.ggml.model"].contents() != "llama":
        raise ValueError(f"{vocab_gguf}: not a SentencePiece (llama) vocabulary")
    m = SentencePieceModel(f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.scores"].contents(),
                           f["tokenizer.ggml.token_type"].contents())
    dest.write_bytes(m.encode())
