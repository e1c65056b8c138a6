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


# --- reading a checkpoint ---------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that cannot be read as given; the message names the file and the problem."""


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are read (and checked) on demand.

    Parsed here rather than through the safetensors package so that BF16 reads without torch and
    every inconsistency (truncated data, overlapping or out-of-file offsets, shapes that do not
    match their byte ranges) is a CheckpointError naming the file, never a crash."""

    def __init__(self, path: str | Path):
        import json as _json

        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors (no header)")
                n = struct.unpack("<Q", head)[0]
                if n > min(size - 8, 100 << 20):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header length {n}")
                header = _json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.size = size
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (start, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt entry for tensor {name!r}") from None
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
            if end - start != nbytes or start < 0 or min(shape, default=1) < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} shape {list(shape)} does not match "
                                      f"its {end - start} bytes")
            if self.base + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{self.base + end}, file has {size}")
            self.entries[name] = (dtype, shape, start, end)
        self._mm = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (BF16 and F16 widened), read from the memory map."""
        dtype, shape, start, end = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.base + start:self.base + end]
        if dtype == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.view(_ST_DTYPES[dtype]).reshape(shape).astype(np.float32)


class Checkpoint:
    """A Hugging Face model folder: config.json, weights (safetensors, single or sharded; .bin with
    torch), tokenizer. Tensors load lazily by HF name, so a 7B model is read layer by layer."""

    def __init__(self, folder: str | Path):
        import json as _json

        self.dir = Path(folder)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint folder")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.dir}: no config.json")
        try:
            self.config = _json.loads(cfg.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        self._where: dict[str, object] = {}
        self._open_weights()

    def _open_weights(self) -> None:
        import json as _json

        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                wmap = _json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: no weight_map ({e})") from None
            files = {}
            for name, fname in wmap.items():
                if fname not in files:
                    p = self.dir / fname
                    if not p.is_file():
                        raise CheckpointError(f"{index}: shard {fname} is missing")
                    files[fname] = SafetensorsFile(p)
                if name not in files[fname].entries:
                    raise CheckpointError(f"{index}: tensor {name!r} is not in shard {fname}")
                self._where[name] = files[fname]
        elif single.is_file():
            st = SafetensorsFile(single)
            self._where = {n: st for n in st.entries}
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            if shards:
                for p in shards:
                    st = SafetensorsFile(p)
                    self._where.update({n: st for n in st.entries})
            elif bins:
                self._open_torch_bins(bins)
            else:
                raise CheckpointError(f"{self.dir}: no weights (model.safetensors, an index, or pytorch_model*.bin)")

    def _open_torch_bins(self, bins: list[Path]) -> None:
        """pytorch_model*.bin: the zip format reads without torch (tensors only, safely); older
        pickle formats need torch."""
        from .torchfile import load_state_dict

        for p in bins:
            try:
                sd = load_state_dict(p)
            except ValueError as e:
                try:
                    import torch
                except ImportError:
                    raise CheckpointError(f"{e}; install torch or use a safetensors copy") from None
                sd = {k: v.float().numpy() for k, v in torch.load(p, map_location="cpu", weights_only=True).items()}
            for name, arr in sd.items():
                self._where[name] = arr

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        return src.shape(name) if isinstance(src, SafetensorsFile) else tuple(src.shape)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        src = self._where[name]
        if isinstance(src, SafetensorsFile):
            return src.get(name)
        return np.asarray(src, dtype=np.float32)


# --- tokenizer -> GGUF vocabulary -------------------------------------------------------------

@dataclass
class Vocab:
    """What llama.cpp needs of a tokenizer (tokenizer.ggml.* keys)."""

    model: str                   # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str = "default"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False

    def write(self, w) -> None:
        """Add the tokenizer.ggml.* keys to a gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for fn, v in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                      (w.add_unk_token_id, self.unk_id), (w.add_pad_token_id, self.pad_id)):
            if v is not None:
                fn(v)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)


# llama.cpp's name for LLaMA-3's byte-level BPE pre-tokenizer, recognised by its split regex.
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def read_tokenizer(folder: str | Path) -> Vocab:
    """tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE) of an HF folder."""
    import json as _json

    folder = Path(folder)
    cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            cfg = _json.loads((folder / "tokenizer_config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from None
    spm, tjs = folder / "tokenizer.model", folder / "tokenizer.json"
    if spm.is_file():
        try:
            m = SentencePieceModel.decode(spm.read_bytes())
        except ValueError as e:
            raise CheckpointError(f"{spm}: {e}") from None
        if m.model_type != 2 and m.model_type != 1:
            raise CheckpointError(f"{spm}: SentencePiece model type {m.model_type} is not supported")
        return Vocab("llama", m.pieces, m.types, m.scores, None, "default",
                     bos_id=m.bos_id if m.bos_id >= 0 else None, eos_id=m.eos_id if m.eos_id >= 0 else None,
                     unk_id=m.unk_id if m.unk_id >= 0 else None, pad_id=m.pad_id if m.pad_id >= 0 else None,
                     add_bos=bool(cfg.get("add_bos_token", True)), add_eos=bool(cfg.get("add_eos_token", False)))
    if tjs.is_file():
        try:
            tj = _json.loads(tjs.read_text())
            model = tj["model"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{tjs}: not a tokenizers file ({e})") from None
        if model.get("type") != "BPE":
            raise CheckpointError(f"{tjs}: tokenizer type {model.get('type')!r} is not supported (BPE is)")
        vocab = model["vocab"]
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        n = max([*vocab.values(), *added.keys()]) + 1
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [5] * n  # unused until filled
        for tok, i in vocab.items():
            tokens[i], types[i] = tok, 1
        for i, t in added.items():
            tokens[i], types[i] = t["content"], 3 if t.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = "llama-bpe" if _LLAMA3_SPLIT in tjs.read_text().replace("\\\\", "\\") else "default"

        def tid(key: str) -> int | None:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is None:
                return None
            ids = [i for i, t in added.items() if t["content"] == v] or [vocab.get(v)]
            return ids[0]

        return Vocab("gpt2", tokens, types, None, merges, pre, bos_id=tid("bos_token"),
                     eos_id=tid("eos_token"), unk_id=tid("unk_token"), pad_id=tid("pad_token"),
                     add_bos=bool(cfg.get("add_bos_token", pre == "llama-bpe")),
                     add_eos=bool(cfg.get("add_eos_token", False)))
    raise CheckpointError(f"{folder}: no tokenizer (tokenizer.model or tokenizer.json)")
