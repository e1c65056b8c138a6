"""pi-info: what a GGUF holds: architecture, shape, activation, sizes, and our powerinfer.* keys."""
from __future__ import annotations

import os
from collections import Counter

from . import format as fmt
from .model_file import GiB, ModelSizes, check_gguf


def model_info(path: str | os.PathLike) -> dict:
    """A dict of the file's facts (what `pi-info --json` prints)."""
    import gguf

    check_gguf(path)
    sizes = ModelSizes.from_gguf(path)  # reads the shape
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    act_field = r.fields.get(fmt.HIDDEN_ACT_KEY.format(arch=arch))
    types = Counter(t.tensor_type.name for t in r.tensors)
    ours = {}
    for name, field in r.fields.items():
        if name.startswith(fmt.NAMESPACE + "."):
            v = field.contents()
            ours[name] = v if not isinstance(v, list) or len(v) <= 16 else f"[{len(v)} values]"
    return {
        "path": str(path),
        "file_bytes": os.path.getsize(path),
        "architecture": arch,
        "name": r.fields["general.name"].contents() if "general.name" in r.fields else None,
        "activation": act_field.contents() if act_field is not None else None,
        "n_layer": sizes.n_layer, "n_embd": sizes.n_embd, "n_ff": sizes.n_ff,
        "n_head": sizes.n_head, "n_head_kv": sizes.n_head_kv, "n_vocab": sizes.n_vocab,
        "tensors": len(r.tensors), "tensor_types": dict(types),
        "weight_bytes": sizes.weight_bytes, "ffn_bytes": sum(sizes.ffn_bytes),
        "powerinfer": ours,
    }


def render(info: dict) -> str:
    lines = [f"{info['path']}: {info['architecture']} '{info['name']}', {info['file_bytes'] / GiB:.2f} GiB",
             f"  shape: {info['n_layer']} layers, n_embd {info['n_embd']}, n_ff {info['n_ff']}, "
             f"heads {info['n_head']}/{info['n_head_kv']} (kv), vocab {info['n_vocab']}",
             f"  activation: {info['activation'] or 'not stated (llama.cpp default for the arch)'}",
             f"  tensors: {info['tensors']} ({', '.join(f'{k} {v}' for k, v in info['tensor_types'].items())}); "
             f"FFN {info['ffn_bytes'] / info['weight_bytes']:.0%} of {info['weight_bytes'] / GiB:.2f} GiB"]
    if info["powerinfer"]:
        lines.append("  powerinfer metadata:")
        lines += [f"    {k} = {v}" for k, v in info["powerinfer"].items()]
    else:
        lines.append("  no powerinfer metadata: a plain llama.cpp file")
    return "\n".join(lines)
