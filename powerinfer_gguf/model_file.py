"""What a GGUF model holds and what it costs: sizes per layer, the firing profile our converter
stored, bytes a decoded token reads, and VRAM budgets ("8GiB", "40%", "auto").

Read from the file's header and its small per-neuron tensors only (no weights loaded), by the
names of format.Keys and format.Tensors. "auto" is llama.cpp's (llama_pi_auto_vram_budget, the
one definition the planner uses too); the read speeds of the bytes bound are defined here once.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from .format import Keys, Tensors

GiB = 1 << 30
MiB = 1 << 20

# Read speeds for the two-sided bound (bytes per token / speed, summed over the sides): host RAM
# streams ~90 GB/s on the H100 machine (../shared/MEASURED.md; the C planner prices a hand-off at
# the same speed, PI_CPU_BYTES_PER_US: a test keeps them equal), HBM3 ~3 TB/s in practice.
CPU_READ_GBPS = 90.0
GPU_READ_GBPS = 3000.0

NO_GPU = "no GPU device (a CPU-only build, or no GPU found); use a budget of 0"

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}

_PREDICTOR = (Tensors.PRED_FC1, Tensors.PRED_FC2, Tensors.PRED_THRESHOLD)


def two_sided_seconds(cpu_bytes: int, gpu_bytes: int) -> float:
    """Time to read a token's bytes, CPU memory and VRAM one after the other."""
    return cpu_bytes / (CPU_READ_GBPS * 1e9) + gpu_bytes / (GPU_READ_GBPS * 1e9)


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf(path: str | os.PathLike) -> None:
    """ValueError naming the problem unless ``path`` is a GGUF file (cheap: reads 4 bytes)."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such model file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file (give a .gguf model file)")
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (it does not start with 'GGUF')")


# --- VRAM budgets -----------------------------------------------------------------------------------


def auto_budget() -> int:
    """The budget "auto" means on this machine's GPU now, as llama.cpp's planner computes it."""
    from .runtime import auto_vram_budget

    budget = auto_vram_budget()
    if budget is None:
        raise ValueError(f"vram budget auto: {NO_GPU}")
    if budget <= 0:
        raise ValueError("vram budget auto: the GPU has less free memory than the planner's margin")
    return budget


def parse_size(text: str | int | float, reference_bytes: int | None = None) -> int:
    """'8GiB', '10GB', '512MiB', '0', '40%' (of reference_bytes: the model's weights), 'auto'."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    if s == "auto":
        return auto_budget()
    if s.endswith("%"):
        return _percent_of(text, s[:-1], reference_bytes)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 0, 512MiB, 8GiB, 10GB, 40% or auto")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def budget_bytes(model_path: str | os.PathLike, vram_budget: str | int) -> int:
    """A VRAM budget as the loader takes it: bytes, or -1 for "auto" (the loader asks the GPU);
    "40%" is of the model's weights. ValueError naming the problem."""
    if str(vram_budget).strip().lower() == "auto":
        return -1
    ref = None
    if str(vram_budget).strip().endswith("%"):
        check_gguf(model_path)
        ref = ModelSizes.from_gguf(model_path).weight_bytes
    budget = parse_size(vram_budget, ref)
    if budget < 0:
        raise ValueError(f"vram_budget={vram_budget!r}: cannot be negative")
    return budget


def is_per_device(vram_budget) -> bool:
    """Whether a budget names devices: {LABEL: SIZE} or "LABEL=SIZE,LABEL=SIZE" """
    return isinstance(vram_budget, dict) or (isinstance(vram_budget, str) and "=" in vram_budget)


def device_budgets(model_path: str | os.PathLike, spec: str | dict) -> dict[str, int]:
    """Budgets per device, {LABEL: SIZE} or "LABEL=SIZE,LABEL=SIZE": LABEL a device's name (CUDA0,
    RPC1) or an RPC host's HOST:PORT, SIZE as budget_bytes takes it. Labels as given, bytes (-1:
    auto); ValueError naming the problem."""
    if isinstance(spec, dict):
        items = [(str(k).strip(), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            label, eq, size = part.partition("=")
            if not eq or not label.strip() or not size.strip():
                raise ValueError(f"vram budget {spec!r}: {part.strip()!r} is not DEVICE=SIZE (e.g. CUDA0=10GiB,"
                                 "192.168.1.2:50052=40GiB)")
            items.append((label.strip(), size.strip()))
    if not items:
        raise ValueError("vram budget: no device named")
    out: dict[str, int] = {}
    for label, size in items:
        if label in out:
            raise ValueError(f"vram budget: {label} is given twice")
        out[label] = budget_bytes(model_path, size)
    return out


def _percent_of(text, number: str, reference_bytes: int | None) -> int:
    if reference_bytes is None:
        raise ValueError(f"budget {text!r}: a percentage needs a model to be a share of")
    try:
        pct = float(number)
    except ValueError:
        raise ValueError(f"bad budget {text!r}") from None
    if not 0 <= pct <= 100:
        raise ValueError(f"budget {text!r}: a percentage must be within 0-100")
    return int(reference_bytes * pct / 100)


# --- the firing profile ---------------------------------------------------------------------------


@dataclass
class SparseProfile:
    """Per-layer firing of a sparse file, as its converter measured it."""

    firing: list[float]      # mean of blk.N.pi_neuron_freq: share of neurons firing per token
    recall: list[float]      # held-out predictor recall
    precision: list[float]   # held-out predictor precision

    def shares(self, layer: int) -> tuple[float, float]:
        """(share of neurons computed that fire, share predicted) per token."""
        fired = self.firing[layer] * self.recall[layer]
        prec = self.precision[layer]
        return fired, (fired / prec if prec > 0 else 1.0)


# --- sizes ----------------------------------------------------------------------------------------


@dataclass
class _LayerTensors:
    """Bytes of blk.N's tensors by role, and its neuron frequencies where the file has them."""

    layer: list[int]
    ffn: list[int]
    pred: list[int]
    freqs: list
    output: int = 0   # output.weight + output_norm (and anything else outside blk.N and token_embd)
    input: int = 0    # token_embd

    @classmethod
    def read(cls, reader, n_layer: int) -> "_LayerTensors":
        t = cls([0] * n_layer, [0] * n_layer, [0] * n_layer, [np.zeros(0)] * n_layer)
        roles = _tensor_roles(n_layer)
        for tensor in reader.tensors:
            m = re.match(r"blk\.(\d+)\.", tensor.name)
            if m and int(m.group(1)) < n_layer:
                t.add_layer(int(m.group(1)), tensor, roles.get(tensor.name))
            elif tensor.name.startswith("token_embd"):
                t.input += int(tensor.n_bytes)
            else:
                t.output += int(tensor.n_bytes)
        return t

    def add_layer(self, i: int, tensor, role: str | None) -> None:
        n = int(tensor.n_bytes)
        self.layer[i] += n
        if role == "ffn":
            self.ffn[i] += n
        elif role == "pred":
            self.pred[i] += n
        elif role == "freq":
            self.freqs[i] = np.asarray(tensor.data, dtype=np.float64).copy()


def _tensor_roles(n_layer: int) -> dict[str, str]:
    """Tensor name -> "ffn", "pred" or "freq" for every layer (attention and norms: no role).
    The FFN: llama.cpp's gate/up/down weights (gguf-py's names) and our down_t."""
    import gguf

    upstream = [gguf.TENSOR_NAMES[t].replace("{bid}", "{}") + ".weight"
                for t in (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN)]
    roles = {}
    for i in range(n_layer):
        roles.update({name.format(i): "ffn" for name in (*upstream, Tensors.FFN_DOWN_T)})
        roles.update({name.format(i): "pred" for name in _PREDICTOR})
        roles[Tensors.NEURON_FREQ.format(i)] = "freq"
    return roles


def is_sparse_file(path: str | os.PathLike) -> bool:
    """Our sparse layout (powerinfer.sparse true): the header alone is read."""
    return _Header(_open_reader(str(path)), str(path)).field(Keys.SPARSE) is True


class _Header:
    """The llama.cpp keys of a GGUF's architecture, with clear errors for missing ones."""

    def __init__(self, reader, path: str):
        self.r, self.path = reader, path
        arch = reader.fields.get("general.architecture")
        if arch is None:
            raise ValueError(f"{path}: GGUF has no general.architecture")
        self.arch = arch.contents()

    def get(self, key: str, default=None):
        f = self.r.fields.get(f"{self.arch}.{key}")
        if f is None:
            if default is None:
                raise ValueError(f"{self.path}: missing key {self.arch}.{key}")
            return default
        return f.contents()

    def n_vocab(self) -> int:
        tokens = self.r.fields.get("tokenizer.ggml.tokens")
        return int(self.get("vocab_size", len(tokens.data) if tokens is not None else 32000))

    def field(self, key: str):
        f = self.r.fields.get(key)
        return None if f is None else f.contents()

    def float_list(self, key: str, n: int) -> list[float]:
        v = self.field(key)
        if not isinstance(v, list) or len(v) != n:
            return [1.0] * n
        return [float(x) for x in v]


def _open_reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors/struct errors on junk
        raise ValueError(f"{path}: not a readable GGUF ({e})") from None


@dataclass
class ModelSizes:
    """What placement needs to know of a GGUF, read from its header (no weights loaded)."""

    path: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    layer_bytes: list[int]        # all tensors of blk.N
    output_bytes: int             # output.weight + output_norm (offloaded with -ngl n_layer+1)
    input_bytes: int              # token_embd (always on the CPU in llama.cpp)
    ffn_bytes: list[int]          # ffn_gate/up/down (or down_t) of blk.N
    pred_bytes: list[int] = field(default_factory=list)  # predictor fc1/fc2/threshold of blk.N
    sparse: "SparseProfile | None" = None                  # our sparse layout, when the file has it
    freqs: list = field(default_factory=list)              # per layer: neuron frequencies, hot-to-cold

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.input_bytes

    def kv_bytes_per_layer(self, n_ctx: int) -> int:
        """F16 K and V cache of one layer (llama.cpp's default cache type)."""
        head_dim = self.n_embd // self.n_head
        return 2 * n_ctx * self.n_head_kv * head_dim * 2

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ModelSizes":
        path = str(path)
        h = _Header(_open_reader(path), path)
        n_layer = int(h.get("block_count"))
        t = _LayerTensors.read(h.r, n_layer)
        n_head = int(h.get("attention.head_count"))
        sparse = None
        if h.field(Keys.SPARSE) is True:
            firing = [float(f.mean()) if len(f) else 0.0 for f in t.freqs]
            sparse = SparseProfile(firing, h.float_list(Keys.PREDICTOR_RECALL, n_layer),
                                   h.float_list(Keys.PREDICTOR_PRECISION, n_layer))
        return cls(path, n_layer, int(h.get("embedding_length")), n_head,
                   int(h.get("attention.head_count_kv", n_head)), int(h.get("feed_forward_length")),
                   h.n_vocab(), t.layer, t.output, t.input, t.ffn, t.pred, sparse, t.freqs if sparse else [])

    def decode_bytes_dense(self) -> int:
        """Weight bytes one decoded token reads on a dense engine: every weight but the token
        embedding, of which one row."""
        return self.weight_bytes - self.input_bytes + self.input_bytes // max(1, self.n_vocab)

    def decode_bytes_sparse(self) -> int:
        """Expected weight bytes per decoded token on our sparse engine: everything but the FFN,
        the predictors, and per layer the gate rows of predicted neurons plus the up and down rows
        of those that fire (the kernel skips up/down when the gate does not fire). Predicted and
        fired shares come from the file (neuron frequencies, held-out recall and precision)."""
        if self.sparse is None:
            return self.decode_bytes_dense()
        total = self.decode_bytes_dense() - sum(self.ffn_bytes)
        for i in range(self.n_layer):
            fired, predicted = self.sparse.shares(i)
            total += self.layer_row_bytes(i, np.full(self.n_ff, predicted), np.full(self.n_ff, fired))
        return int(total)

    def layer_row_bytes(self, layer: int, predicted: np.ndarray, fired: np.ndarray) -> float:
        """Expected bytes one token reads from FFN rows with these per-row probabilities: the
        gate row when predicted, up and down rows when the neuron fires."""
        row = self.ffn_bytes[layer] / (3 * self.n_ff)
        return float(row * (predicted.sum() + 2 * fired.sum()))

    def _row_probabilities(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row of a layer: (predicted, fired) per token, from the neuron frequencies and the
        layer's held-out recall and precision (predicted = fired / precision)."""
        s = self.sparse
        f = self.freqs[layer] * s.recall[layer] if len(self.freqs[layer]) else np.full(self.n_ff, s.firing[layer])
        prec = s.precision[layer]
        return (np.minimum(1.0, f / prec) if prec > 0 else np.ones_like(f)), f

    def split_decode_bytes(self, gpu_rows: list[int], attn_gpu: list[bool], output_gpu: bool) -> tuple[int, int]:
        """(CPU, GPU) weight bytes one decoded token reads on our engine under a placement:
        per layer, attention + predictor where the layer runs, and the expected row reads of the
        hot rows [0, h) on the GPU and of the cold rows on the CPU."""
        assert self.sparse is not None
        cpu, gpu = self.input_bytes // max(1, self.n_vocab), 0
        for i in range(self.n_layer):
            p, f = self._row_probabilities(i)
            h = gpu_rows[i]
            base = self.layer_bytes[i] - self.ffn_bytes[i]
            gpu += self.layer_row_bytes(i, p[:h], f[:h]) + (base if attn_gpu[i] else 0)
            cpu += self.layer_row_bytes(i, p[h:], f[h:]) + (0 if attn_gpu[i] else base)
        if output_gpu:
            gpu += self.output_bytes
        else:
            cpu += self.output_bytes
        return int(cpu), int(gpu)

    def stock_split_bytes(self, gpu_layers: set[int], ffn_cpu_layers: set[int], output_gpu: bool) -> tuple[int, int]:
        """(CPU, GPU) weight bytes one decoded token reads on stock llama.cpp: every weight of
        the layers in gpu_layers from VRAM except the FFN of ffn_cpu_layers (-ot)."""
        cpu, gpu = self.input_bytes // max(1, self.n_vocab), 0
        for i in range(self.n_layer):
            attn = self.layer_bytes[i] - self.ffn_bytes[i]
            if i not in gpu_layers:
                cpu += self.layer_bytes[i]
            elif i in ffn_cpu_layers:
                gpu, cpu = gpu + attn, cpu + self.ffn_bytes[i]
            else:
                gpu += self.layer_bytes[i]
        if output_gpu:
            gpu += self.output_bytes
        else:
            cpu += self.output_bytes
        return int(cpu), int(gpu)
