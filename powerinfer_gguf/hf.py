"""Hugging Face checkpoint conventions: tensor names, the Q/K RoPE permutation, tokenizer.model.

llama.cpp's RoPE (type NORM) rotates adjacent pairs of a head; HF LLaMA rotates the two halves.
llama.cpp's converter reorders the rows of Q and K accordingly (``permute_qk_to_gguf``); the
synthetic generator writes HF checkpoints with the inverse.

Libraries do the reading: safetensors for weights, sentencepiece's ModelProto for
tokenizer.model, gguf-py's tensor name map for llama.cpp's names. What is ours is a thin layer
of checks that names the file and the problem in one line (a CheckpointError).
"""
from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# HF LLaMA's tensor names ({bid}: the layer); gguf-py's TensorNameMap gives each its llama.cpp name.
_HF_LLAMA = ("model.embed_tokens", "model.norm", "lm_head", "model.layers.{bid}.input_layernorm",
             "model.layers.{bid}.post_attention_layernorm", "model.layers.{bid}.self_attn.q_proj",
             "model.layers.{bid}.self_attn.k_proj", "model.layers.{bid}.self_attn.v_proj",
             "model.layers.{bid}.self_attn.o_proj", "model.layers.{bid}.mlp.gate_proj",
             "model.layers.{bid}.mlp.up_proj", "model.layers.{bid}.mlp.down_proj")


@functools.cache
def _hf_by_gguf() -> dict[str, str]:
    """llama.cpp name template (``blk.{bid}.attn_q``) -> HF name template."""
    import gguf

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, 1)
    return {gguf.TENSOR_NAMES[names.get_type(hf.format(bid=0))]: hf for hf in _HF_LLAMA}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.ffn_gate.weight`` -> ``model.layers.3.mlp.gate_proj.weight``."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", gguf_name)
    key = m and ("blk.{bid}." if m.group(1) else "") + m.group(2)
    if not m or key not in _hf_by_gguf():
        raise KeyError(f"no HF name for tensor {gguf_name!r}")
    return _hf_by_gguf()[key].format(bid=m.group(1)) + ".weight"


def permute_qk_to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate halves) row order -> llama.cpp (rotate adjacent pairs) row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk_to_gguf`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as given; the message names the file and the problem."""


_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def reject_lfs_pointer(path: Path) -> None:
    """A Git LFS pointer (a clone without ``git lfs pull``) stands where the file should be."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror})") from None
    if head == _LFS_POINTER:
        raise CheckpointError(f"{path} is a Git LFS pointer, not the file: run git lfs pull")


# --- SentencePiece ModelProto -------------------------------------------------------------------
# Piece types are numbered alike in SentencePiece and GGUF (tokenizer.ggml.token_type):
# 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.


def _model_proto():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise CheckpointError(f"tokenizer.model needs the sentencepiece and protobuf packages ({e})") from None
    return sentencepiece_model_pb2.ModelProto()


@dataclass
class SentencePieceModel:
    """The fields of a tokenizer.model that llama.cpp's vocabulary needs."""

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
        m = _model_proto()
        for p, s, t in zip(self.pieces, self.scores, self.types):
            piece = m.pieces.add()
            piece.piece, piece.score, piece.type = p, s, t
        ts = m.trainer_spec
        ts.model_type, ts.vocab_size, ts.byte_fallback = self.model_type, len(self.pieces), self.byte_fallback
        ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = self.unk_id, self.bos_id, self.eos_id, self.pad_id
        ns = m.normalizer_spec
        ns.name, ns.add_dummy_prefix = "identity", self.add_dummy_prefix
        ns.remove_extra_whitespaces, ns.escape_whitespaces = False, True
        return m.SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> "SentencePieceModel":
        from google.protobuf.message import DecodeError

        m = _model_proto()
        try:
            m.ParseFromString(data)
        except DecodeError as e:
            raise ValueError(f"corrupt SentencePiece model ({e})") from None
        if not m.pieces:
            raise ValueError("not a SentencePiece model: no pieces")
        ts = m.trainer_spec
        return cls([p.piece for p in m.pieces], [p.score for p in m.pieces], [p.type for p in m.pieces],
                   ts.model_type, ts.byte_fallback, m.normalizer_spec.add_dummy_prefix,
                   ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id)


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

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start, {name: (dtype, shape, start, end)}) of a .safetensors file, every entry checked
    against the file's size: the one-line messages the library's errors do not give, and the
    offsets BF16 is read by."""
    import json as _json

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors (no header)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
            header = _json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    return 8 + n, {name: _checked_entry(path, name, e, 8 + n, size) for name, e in header.items()}


def _checked_entry(path: Path, name: str, e, base: int, size: int) -> tuple[str, tuple[int, ...], int, int]:
    try:
        dtype, shape, (start, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if end - start != nbytes or start < 0 or min(shape, default=1) < 0:
        raise CheckpointError(f"{path}: tensor {name!r} shape {list(shape)} does not match its {end - start} bytes")
    if base + end > size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
    return dtype, shape, start, end


class SafetensorsFile:
    """One .safetensors file: checked when opened (our header checks, then the safetensors
    library's own), tensors read on demand through the library."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        reject_lfs_pointer(self.path)
        self.base, self.entries = _safetensors_header(self.path)
        try:
            self._st = safe_open(str(self.path), framework="numpy")
        except Exception as e:  # safetensors raises its own SafetensorError (no public base class)
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({e})") from None
        self._mm = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (BF16 and F16 widened)."""
        dtype, shape, start, end = self.entries[name]
        if dtype != "BF16":
            return self._st.get_tensor(name).astype(np.float32)
        # numpy has no bfloat16, so the library's numpy reader refuses BF16: its bytes are read
        # here (mapped, at the header's offsets) and widened to float32.
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.base + start:self.base + end]
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)


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
        reject_lfs_pointer(cfg)
        self.files: list[Path] = [cfg]  # what is read: outputs may not be any of these
        try:
            self.config = _json.loads(cfg.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        self._where: dict[str, object] = {}
        self._open_weights()
        self.files += [p for p in (self.dir / n for n in _TOKENIZER_FILES) if p.is_file()]

    def _open_weights(self) -> None:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            self._open_index(index)
        elif single.is_file():
            st = SafetensorsFile(single)
            self.files.append(single)
            self._where = {n: st for n in st.entries}
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            self.files += shards or bins
            if shards:
                for p in shards:
                    st = SafetensorsFile(p)
                    self._where.update({n: st for n in st.entries})
            elif bins:
                self._open_torch_bins(bins)
            else:
                raise CheckpointError(f"{self.dir}: no weights (model.safetensors, an index, or pytorch_model*.bin)")

    def _open_index(self, index: Path) -> None:
        """Sharded safetensors: every shard the index names must be there (checked before any is read)."""
        import json as _json

        reject_lfs_pointer(index)
        try:
            wmap = _json.loads(index.read_text())["weight_map"]
            shards = sorted(set(wmap.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: no weight_map ({e})") from None
        missing = [f for f in shards if not (self.dir / f).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{index}: shard {missing[0]} is missing{more}")
        self.files += [index] + [self.dir / f for f in shards]
        files = {f: SafetensorsFile(self.dir / f) for f in shards}
        for name, fname in wmap.items():
            if name not in files[fname].entries:
                raise CheckpointError(f"{index}: tensor {name!r} is not in shard {fname}")
            self._where[name] = files[fname]

    def _open_torch_bins(self, bins: list[Path]) -> None:
        """pytorch_model*.bin: the zip format reads without torch (tensors only, safely); older
        pickle formats need torch."""
        from .torchfile import load_state_dict

        for p in bins:
            reject_lfs_pointer(p)
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


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

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
        reject_lfs_pointer(spm)
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
        reject_lfs_pointer(tjs)
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
