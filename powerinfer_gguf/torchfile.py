"""Read PyTorch state dicts (``torch.save`` zip format) into numpy without torch, safely.

PowerInfer's published predictors (``model_N.pt``) and older HF checkpoints (``pytorch_model.bin``)
are torch pickles. Unpickling runs whatever the file names, so this reader allows exactly the
globals a state dict of tensors needs (tensor rebuild, storage types, OrderedDict) and refuses
everything else: a hostile file gets a ValueError, never code execution.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bf16",
             "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
             "BoolStorage": np.bool_}


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    data, dtype = storage
    raw = np.frombuffer(data, dtype=np.uint16 if dtype == "bf16" else dtype)
    if dtype == "bf16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    n = int(np.prod(size)) if len(size) else 1
    if n == 0:
        return np.zeros(size, dtype=raw.dtype)
    need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
    if offset < 0 or need > raw.size or any(st < 0 for st in stride):
        raise ValueError("tensor view outside its storage")
    out = np.lib.stride_tricks.as_strided(raw[offset:], shape=tuple(size),
                                          strides=tuple(st * raw.itemsize for st in stride))
    return np.array(out)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, prefix: str):
        super().__init__(f)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise ValueError(f"refusing to load {module}.{name} from a torch file (only tensors are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise ValueError("unexpected persistent id in torch file")
        try:
            data = self.zf.read(f"{self.prefix}/data/{pid[2]}")
        except KeyError:
            raise ValueError(f"storage {pid[2]} missing from torch file") from None
        return data, pid[1].dtype


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of a torch.save'd state dict (zip format, torch >= 1.6)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"{path}: not a PyTorch zip file (older pickle formats need torch)") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: no data.pkl in the torch zip")
        prefix = pkl[0][: -len("/data.pkl")]
        import io

        try:
            obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        except Exception as e:  # truncated or corrupt pickle
            raise ValueError(f"{path}: corrupt torch file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return dict(obj)
