"""pi-bench: prompt and decode speed, side by side, at one VRAM budget.

One run measures into one :class:`BenchResult`; the table, ``--json`` and ``--plot`` are renderings
of it (llama-bench's printer idea). Each side is timed by llama-bench from its own build (stock:
unpatched; ours: patched), one repetition per invocation, the sides interleaved round by round so
that machine noise hits both alike.

Stock's best use of a small GPU is layer offload: the largest ``-ngl`` whose weights, KV cache and
compute buffer fit the budget, computed from the GGUF's tensor sizes (:func:`stock_offload`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .format import Keys

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
AUTO_MARGIN = 1 * GiB  # "auto": free VRAM minus this


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
    ffn_bytes: list[int]          # ffn_gate/up/down of blk.N
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
        import gguf

        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such model file: {path}")
        try:
            r = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises bare ValueErrors/struct errors on junk
            raise ValueError(f"{path}: not a readable GGUF ({e})") from None
        arch = r.fields["general.architecture"].contents() if "general.architecture" in r.fields else None
        if arch is None:
            raise ValueError(f"{path}: GGUF has no general.architecture")

        def kv(key: str, default=None):
            f = r.fields.get(f"{arch}.{key}")
            if f is None:
                if default is None:
                    raise ValueError(f"{path}: missing key {arch}.{key}")
                return default
            return f.contents()

        n_layer = int(kv("block_count"))
        layer = [0] * n_layer
        ffn = [0] * n_layer
        pred = [0] * n_layer
        firing = [0.0] * n_layer
        freqs = [np.zeros(0)] * n_layer
        out = inp = 0
        for t in r.tensors:
            m = re.match(r"blk\.(\d+)\.", t.name)
            if m and int(m.group(1)) < n_layer:
                i = int(m.group(1))
                layer[i] += int(t.n_bytes)
                if re.match(r"blk\.\d+\.ffn_(gate|up|down|down_t)\.", t.name):
                    ffn[i] += int(t.n_bytes)
                elif re.match(r"blk\.\d+\.pi_pred_", t.name):
                    pred[i] += int(t.n_bytes)
                elif re.match(r"blk\.\d+\.pi_neuron_freq", t.name):
                    freqs[i] = np.asarray(t.data, dtype=np.float64).copy()
                    firing[i] = float(freqs[i].mean())
            elif t.name.startswith("token_embd"):
                inp += int(t.n_bytes)
            else:
                out += int(t.n_bytes)
        n_head = int(kv("attention.head_count"))
        tokens = r.fields.get("tokenizer.ggml.tokens")
        n_vocab = int(kv("vocab_size", len(tokens.data) if tokens is not None else 32000))
        sparse = None
        if _field(r, Keys.SPARSE) is True:
            sparse = SparseProfile(firing, _float_list(r, Keys.PREDICTOR_RECALL, n_layer),
                                   _float_list(r, Keys.PREDICTOR_PRECISION, n_layer))
        return cls(path, n_layer, int(kv("embedding_length")), n_head,
                   int(kv("attention.head_count_kv", n_head)), int(kv("feed_forward_length")),
                   n_vocab, layer, out, inp, ffn, pred, sparse, freqs if sparse else [])

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

    def split_decode_bytes(self, gpu_rows: list[int], attn_gpu: list[bool], output_gpu: bool) -> tuple[int, int]:
        """(CPU, GPU) weight bytes one decoded token reads on our engine under a placement:
        per layer, attention + predictor where the layer runs, and the expected row reads of the
        hot rows [0, h) on the GPU and of the cold rows on the CPU (per-neuron frequencies from
        the file; predicted = fired / precision, the layer's held-out figures)."""
        assert self.sparse is not None
        cpu = self.input_bytes // max(1, self.n_vocab)
        gpu = 0
        for i in range(self.n_layer):
            base = self.layer_bytes[i] - self.ffn_bytes[i]
            f = self.freqs[i] * self.sparse.recall[i] if len(self.freqs[i]) else np.full(self.n_ff, self.sparse.firing[i])
            prec = self.sparse.precision[i]
            p = np.minimum(1.0, f / prec) if prec > 0 else np.ones_like(f)
            h = gpu_rows[i]
            hot = self.layer_row_bytes(i, p[:h], f[:h])
            cold = self.layer_row_bytes(i, p[h:], f[h:])
            if attn_gpu[i]:
                gpu += base
            else:
                cpu += base
            gpu += hot
            cpu += cold
        if output_gpu:
            gpu += self.output_bytes
        else:
            cpu += self.output_bytes
        return int(cpu), int(gpu)

    def stock_split_bytes(self, gpu_layers: set[int], ffn_cpu_layers: set[int], output_gpu: bool) -> tuple[int, int]:
        """(CPU, GPU) weight bytes one decoded token reads on stock llama.cpp: every weight of
        the layers in gpu_layers from VRAM except the FFN of ffn_cpu_layers (-ot)."""
        cpu = self.input_bytes // max(1, self.n_vocab)
        gpu = 0
        for i in range(self.n_layer):
            attn = self.layer_bytes[i] - self.ffn_bytes[i]
            if i in gpu_layers:
                gpu += attn
                if i in ffn_cpu_layers:
                    cpu += self.ffn_bytes[i]
                else:
                    gpu += self.ffn_bytes[i]
            else:
                cpu += self.layer_bytes[i]
        if output_gpu:
            gpu += self.output_bytes
        else:
            cpu += self.output_bytes
        return int(cpu), int(gpu)


# Read speeds for the two-sided bound (bytes per token / speed, summed over the sides): host RAM
# streams ~90 GB/s on the H100 machine (../shared/MEASURED.md), H100 HBM3 ~3 TB/s in practice.
CPU_READ_GBPS = 90.0
GPU_READ_GBPS = 3000.0


def two_sided_seconds(cpu_bytes: int, gpu_bytes: int) -> float:
    return cpu_bytes / (CPU_READ_GBPS * 1e9) + gpu_bytes / (GPU_READ_GBPS * 1e9)


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


def _field(r, key: str):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def _float_list(r, key: str, n: int) -> list[float]:
    v = _field(r, key)
    if not isinstance(v, list) or len(v) != n:
        return [1.0] * n
    return [float(x) for x in v]


def parse_size(text: str | int | float, reference_bytes: int | None = None) -> int:
    """'8GiB', '10GB', '512MiB', '0', '40%' (of reference_bytes: the model's weights), 'auto'."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    if s == "auto":
        free = gpu_free_bytes()
        return max(0, free - AUTO_MARGIN) if free else 0
    if s.endswith("%"):
        if reference_bytes is None:
            raise ValueError(f"budget {text!r}: a percentage needs a model to be a share of")
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"bad budget {text!r}") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"budget {text!r}: a percentage must be within 0-100")
        return int(reference_bytes * pct / 100)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 0, 512MiB, 8GiB, 10GB, 40% or auto")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gpu_free_bytes() -> int:
    """Free memory of the first NVIDIA GPU, 0 where there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    r = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return 0
    return int(float(r.stdout.split()[0]) * (1 << 20))


@dataclass
class Offload:
    """A stock layer-offload plan: -ngl and what it puts on the GPU."""

    ngl: int
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.compute_bytes


def compute_buffer_estimate(sizes: ModelSizes, n_ctx: int, n_ubatch: int, output_on_gpu: bool) -> int:
    """Rough size of llama.cpp's GPU compute buffer (f32 activations of one ubatch). An estimate,
    not llama.cpp's exact reservation: it keeps the plan on the safe side of the budget."""
    per_tok = 4 * (4 * sizes.n_embd + 2 * sizes.n_ff + sizes.n_head * n_ctx)
    if output_on_gpu:
        per_tok += 4 * sizes.n_vocab
    return per_tok * n_ubatch


def stock_offload(sizes: ModelSizes, budget: int, n_ctx: int, n_ubatch: int = 512) -> Offload:
    """The largest -ngl whose weights + KV cache + compute buffer fit ``budget`` bytes.

    llama.cpp's order (src/llama-model.cpp load_tensors): -ngl 1 puts the output layer on the
    GPU, each further one the next repeating layer from the last; each offloaded layer keeps its
    KV cache on the GPU. The token embedding stays on the CPU. Budget 0 gives ngl 0."""
    best = Offload(0, 0, 0, 0)
    kv = sizes.kv_bytes_per_layer(n_ctx)
    for ngl in range(1, sizes.n_layer + 2):
        n_rep = ngl - 1
        w = sum(sizes.layer_bytes[sizes.n_layer - n_rep:]) + sizes.output_bytes
        plan = Offload(ngl, w, kv * n_rep, compute_buffer_estimate(sizes, n_ctx, min(n_ubatch, n_ctx), True))
        if plan.gpu_bytes > budget:
            break
        best = plan
    return best


@dataclass
class OverridePlan(Offload):
    """Stock's other way to use a small GPU (-ot): every layer's attention and KV cache and the
    output layer on the GPU (ngl = all), the FFN weights of the first ``ffn_cpu`` layers kept in
    CPU memory by tensor overrides (the rest on the GPU too)."""

    ffn_cpu: int = 0

    def args(self) -> list[str]:
        args = ["-ngl", str(self.ngl)]
        if self.ffn_cpu:
            layers = "|".join(str(i) for i in range(self.ffn_cpu))
            args += ["-ot", f"blk\\.({layers})\\.ffn_(gate|up|down)\\.weight=CPU"]
        return args


def stock_override(sizes: ModelSizes, budget: int, n_ctx: int, n_ubatch: int = 512) -> "OverridePlan | None":
    """The -ot plan that keeps the fewest FFN layers on the CPU within ``budget``; None when
    attention, KV and output alone do not fit."""
    kv = sizes.kv_bytes_per_layer(n_ctx) * sizes.n_layer
    attn = sum(b - f for b, f in zip(sizes.layer_bytes, sizes.ffn_bytes)) + sizes.output_bytes
    comp = compute_buffer_estimate(sizes, n_ctx, min(n_ubatch, n_ctx), True)
    for m in range(sizes.n_layer + 1):
        plan = OverridePlan(sizes.n_layer + 1, attn + sum(sizes.ffn_bytes[m:]), kv, comp, ffn_cpu=m)
        if plan.gpu_bytes <= budget:
            return plan
    return None


# --- running llama-bench ----------------------------------------------------------------------


@dataclass
class SideResult:
    name: str                      # "stock" or "ours"
    binary: str
    model: str
    args: list[str]
    strategy: str                  # e.g. "-ngl 12"
    gpu_bytes: int
    decode_bytes: int = 0          # weight bytes one decoded token reads (expected)
    cpu_bytes: int = 0             # ... of which from CPU memory
    gpu_bytes_read: int = 0        # ... and from GPU memory
    placement: "Placement | None" = None  # ours under a budget: the planner's decision
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)

    @staticmethod
    def _mean_sd(xs: list[float]) -> tuple[float, float]:
        if not xs:
            return 0.0, 0.0
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    @property
    def pp_tps(self) -> float:
        return self._mean_sd(self.pp_samples)[0]

    @property
    def tg_tps(self) -> float:
        return self._mean_sd(self.tg_samples)[0]

    def summary(self) -> dict:
        pp, pp_sd = self._mean_sd(self.pp_samples)
        tg, tg_sd = self._mean_sd(self.tg_samples)
        return {"pp_tps": pp, "pp_sd": pp_sd, "tg_tps": tg, "tg_sd": tg_sd,
                "pp_samples": self.pp_samples, "tg_samples": self.tg_samples,
                "strategy": self.strategy, "gpu_bytes": self.gpu_bytes, "binary": self.binary,
                "model": self.model, "args": self.args, "decode_bytes": self.decode_bytes,
                "decode_gbps": tg * self.decode_bytes / 1e9, "cpu_bytes_per_token": self.cpu_bytes,
                "gpu_bytes_per_token": self.gpu_bytes_read,
                "bound_seconds_per_token": two_sided_seconds(self.cpu_bytes, self.gpu_bytes_read),
                **({"placement": asdict(self.placement)} if self.placement else {})}


@dataclass
class BenchResult:
    model: str
    budget_bytes: int
    threads: int
    n_prompt: int
    n_gen: int
    repetitions: int
    weight_bytes: int
    sides: dict[str, SideResult]

    def to_json(self) -> dict:
        d = {"model": self.model, "budget_bytes": self.budget_bytes, "threads": self.threads,
             "n_prompt": self.n_prompt, "n_gen": self.n_gen, "repetitions": self.repetitions,
             "weight_bytes": self.weight_bytes}
        for name, side in self.sides.items():
            d[name] = side.summary()
        if "stock" in self.sides and "ours" in self.sides and self.sides["stock"].tg_tps:
            d["ratio_tg"] = self.sides["ours"].tg_tps / self.sides["stock"].tg_tps
            if self.sides["stock"].pp_tps:
                d["ratio_pp"] = self.sides["ours"].pp_tps / self.sides["stock"].pp_tps
            st, ours = self.sides["stock"], self.sides["ours"]
            if self.budget_bytes > 0 and ours.cpu_bytes + ours.gpu_bytes_read:
                # two-sided bound: bytes from CPU memory at CPU_READ_GBPS plus bytes from VRAM at
                # GPU_READ_GBPS, per token, stock's over ours
                d["bound_tg"] = (two_sided_seconds(st.cpu_bytes, st.gpu_bytes_read)
                                 / two_sided_seconds(ours.cpu_bytes, ours.gpu_bytes_read))
                d["share_of_bound"] = d["ratio_tg"] / d["bound_tg"]
            elif ours.decode_bytes:
                # bytes-per-token bound: the ratio if both sides read weights at the same speed
                d["bound_tg"] = st.decode_bytes / ours.decode_bytes
                d["share_of_bound"] = d["ratio_tg"] / d["bound_tg"]
        return d


@dataclass
class Placement:
    """Our planner's decision, as llama.cpp logs it (src/llama-powerinfer-placement.cpp)."""

    layers: int            # layers whose attention, predictor and KV are on the GPU (the last ones)
    output: bool           # output layer on the GPU
    base_gib: float        # those weights + KV
    rows_gib: float        # hot FFN rows on the GPU
    mass: float            # share of the offloaded layers' activation mass in those rows
    gpu_rows: list[int]    # per layer: FFN rows in GPU memory

    @property
    def gpu_bytes(self) -> int:
        return int((self.base_gib + self.rows_gib) * GiB)

    def describe(self, n_layer: int) -> str:
        return (f"{self.layers}/{n_layer} layers{' + output' if self.output else ''} on GPU, "
                f"hot rows {self.rows_gib:.2f} GiB ({self.mass:.0f}% of mass)")


def parse_placement(log: list[str], n_layer: int) -> "Placement | None":
    head = rows = None
    for line in log:
        if "powerinfer: VRAM budget" in line:
            head = re.search(r"(\d+) of (\d+) layers on the GPU \(.*?\)( \+ output)?, ([\d.]+) GiB; hot FFN rows "
                             r"([\d.]+) GiB \(([\d.]+)%", line)
        elif "powerinfer: GPU rows per layer" in line:
            rows = dict((int(a), int(b)) for a, b in re.findall(r"(\d+):(\d+)", line.split(")", 1)[1]))
    if head is None or rows is None:
        return None
    return Placement(int(head.group(1)), bool(head.group(3)), float(head.group(4)), float(head.group(5)),
                     float(head.group(6)), [rows.get(i, 0) for i in range(n_layer)])


def llama_bench_once(binary: str, model: str, args: list[str], n_prompt: int, n_gen: int,
                     threads: int, log: list[str] | None = None) -> tuple[float | None, float | None]:
    """One repetition of llama-bench (its own warm-up included); returns (pp t/s, tg t/s).
    ``log`` gets llama.cpp's log lines (stderr)."""
    cmd = [binary, "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", "1", "-o", "json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log[:] = r.stderr.splitlines()
    if r.returncode != 0:
        for line in r.stderr.splitlines():
            if "powerinfer:" in line and ("budget" in line or "vram" in line.lower()):
                raise RuntimeError(f"{Path(binary).name} failed on {model}: {line.split('powerinfer:', 1)[1].strip()}")
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{Path(binary).name} failed on {model}: {last}")
    try:
        records = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{Path(binary).name}: unreadable JSON output") from None
    pp = tg = None
    for rec in records:
        if rec.get("n_prompt", 0) > 0 and rec.get("n_gen", 0) == 0:
            pp = float(rec["avg_ts"])
        elif rec.get("n_gen", 0) > 0 and rec.get("n_prompt", 0) == 0:
            tg = float(rec["avg_ts"])
    return pp, tg


def run_bench(model: str, stock_model: str | None = None, budget: str | int = 0,
              threads: int | None = None, n_prompt: int = 64, n_gen: int = 128,
              repetitions: int = 3, progress=print) -> BenchResult:
    """Both sides at one budget: ours (patched llama-bench on our sparse file) and stock
    (unpatched llama-bench on the stock twin, or on ``model`` itself when it is a plain GGUF),
    one repetition per invocation, interleaved round by round."""
    from .build import bin_path

    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise ValueError("need -p and/or -n above 0")
    if repetitions < 1:
        raise ValueError("need at least one repetition")
    sizes = ModelSizes.from_gguf(model)
    ours_file = sizes.sparse is not None
    if not ours_file and stock_model is not None:
        raise ValueError(f"{model} has no sparse layout (not a pi-convert output): give it alone "
                         "for a stock-only run, or give our file with --stock TWIN")
    stock_path = stock_model if ours_file else model
    stock_sizes = ModelSizes.from_gguf(stock_path) if stock_path else None
    if stock_sizes is not None and ours_file and (stock_sizes.n_layer, stock_sizes.n_embd, stock_sizes.n_ff) != \
            (sizes.n_layer, sizes.n_embd, sizes.n_ff):
        raise ValueError(f"{stock_path} is not the same shape as {model}: not its stock twin")
    ref = stock_sizes or sizes
    budget_bytes = parse_size(budget, ref.weight_bytes)
    if budget_bytes < 0:
        raise ValueError("the VRAM budget cannot be negative")
    threads = threads or os.cpu_count() or 1
    n_ctx = n_prompt + n_gen
    sides: dict[str, SideResult] = {}
    if stock_sizes is not None:
        # Stock's two ways to use a small GPU, both run; the faster one is "stock" (see below).
        # Both sides load the weights into memory (-lm none, no mmap): faster for both on the CPU
        # (stock 3B here 3.23 vs 2.95 t/s mmapped), and ours needs it for 2 MB pages (patches/0006).
        L = stock_sizes.n_layer
        plan = stock_offload(stock_sizes, budget_bytes, n_ctx)
        n_rep = max(0, plan.ngl - 1)
        c, g = stock_sizes.stock_split_bytes(set(range(L - n_rep, L)), set(), plan.ngl > 0)
        sides["stock"] = SideResult("stock", str(bin_path("stock", "llama-bench")), stock_path,
                                    ["-ngl", str(plan.ngl), "-lm", "none"], f"-ngl {plan.ngl}/{L + 1}",
                                    plan.gpu_bytes, stock_sizes.decode_bytes_dense(), cpu_bytes=c, gpu_bytes_read=g)
        ot = stock_override(stock_sizes, budget_bytes, n_ctx) if budget_bytes > 0 else None
        if ot is not None and plan.ngl <= L:  # (at ngl L+1 everything is on the GPU already)
            c, g = stock_sizes.stock_split_bytes(set(range(L)), set(range(ot.ffn_cpu)), True)
            sides["stock_ot"] = SideResult(
                "stock_ot", str(bin_path("stock", "llama-bench")), stock_path, ot.args() + ["-lm", "none"],
                f"-ot: attention+KV+output on GPU, FFN of {ot.ffn_cpu}/{L} layers on CPU", ot.gpu_bytes,
                stock_sizes.decode_bytes_dense(), cpu_bytes=c, gpu_bytes_read=g)
    if ours_file:
        args = ["-ngl", "0", "-lm", "none"]
        strategy = "sparse FFN, CPU"
        if budget_bytes > 0:
            # -v: llama-bench passes llama.cpp's log on only when verbose, and the planner's decision
            # (and any refusal of the budget) is in it
            args = ["-ngl", "99", "-lm", "none", "-v",
                    "--override-kv", f"{Keys.Runtime.VRAM_BUDGET}=int:{budget_bytes}",
                    "--override-kv", f"{Keys.Runtime.VRAM_CTX}=int:{n_ctx}"]
            strategy = "planned at load"
        c = sizes.decode_bytes_sparse()
        sides["ours"] = SideResult("ours", str(bin_path("patched", "llama-bench")), model, args, strategy, 0, c,
                                   cpu_bytes=c, gpu_bytes_read=0)
    for rep in range(repetitions):
        # ours first: a budget llama.cpp refuses fails the run before stock has spent its time
        for side in sorted(sides.values(), key=lambda x: x.name != "ours"):
            log: list[str] = []
            pp, tg = llama_bench_once(side.binary, side.model, side.args, n_prompt, n_gen, threads, log)
            if side.name == "ours" and budget_bytes > 0 and rep == 0:
                side.placement = parse_placement(log, sizes.n_layer)
                if side.placement is not None:
                    pl = side.placement
                    side.strategy = pl.describe(sizes.n_layer)
                    side.gpu_bytes = pl.gpu_bytes
                    side.cpu_bytes, side.gpu_bytes_read = sizes.split_decode_bytes(
                        pl.gpu_rows, [i >= sizes.n_layer - pl.layers for i in range(sizes.n_layer)], pl.output)
                    side.decode_bytes = side.cpu_bytes + side.gpu_bytes_read
            if pp is not None:
                side.pp_samples.append(pp)
            if tg is not None:
                side.tg_samples.append(tg)
            progress(f"[{rep + 1}/{repetitions}] {side.name}: "
                     + (f"pp{n_prompt} {pp:.2f} t/s  " if pp else "") + (f"tg{n_gen} {tg:.2f} t/s" if tg else ""))
    if "stock_ot" in sides:
        # the table and the ratio use stock's faster way at this budget; the other is "stock_alt"
        best, alt = sorted((sides.pop("stock"), sides.pop("stock_ot")), key=lambda x: -x.tg_tps)
        best.name, alt.name = "stock", "stock_alt"
        sides = {"stock": best, "stock_alt": alt, **sides}
    return BenchResult(model, budget_bytes, threads, n_prompt, n_gen, repetitions, ref.weight_bytes, sides)


def render_table(res: BenchResult) -> str:
    """Markdown table, llama-bench style (mean +- sd over repetitions)."""
    lines = [f"model: {res.model} ({res.weight_bytes / GiB:.2f} GiB of weights), VRAM budget "
             f"{res.budget_bytes / GiB:.2f} GiB, {res.threads} threads, {res.repetitions} repetitions",
             "", "| side | placement | GPU GiB | pp{0} t/s | tg{1} t/s | GB read/token | GB/s |".format(
                 res.n_prompt, res.n_gen),
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in res.sides.values():
        d = s.summary()
        pp = f"{d['pp_tps']:.2f} ± {d['pp_sd']:.2f}" if s.pp_samples else "-"
        tg = f"{d['tg_tps']:.2f} ± {d['tg_sd']:.2f}" if s.tg_samples else "-"
        gbps = f"{d['decode_gbps']:.1f}" if s.tg_samples else "-"
        read = (f"{s.cpu_bytes / 1e9:.2f} CPU + {s.gpu_bytes_read / 1e9:.2f} GPU" if res.budget_bytes > 0
                else f"{s.decode_bytes / 1e9:.3f}")
        lines.append(f"| {s.name} | {s.strategy} | {s.gpu_bytes / GiB:.2f} | {pp} | {tg} | {read} | {gbps} |")
    j = res.to_json()
    if "stock_alt" in res.sides:
        lines.append(f"\nstock at this budget: the faster of -ngl and -ot, both run: {res.sides['stock'].strategy}")
    if "ratio_tg" in j:
        lines.append(f"\ndecode ratio ours/stock: {j['ratio_tg']:.2f}x")
    if "bound_tg" in j:
        kind = (f"two-sided bound (CPU {CPU_READ_GBPS:.0f} GB/s, GPU {GPU_READ_GBPS:.0f} GB/s)"
                if res.budget_bytes > 0 else "bytes-per-token bound")
        lines.append(f"{kind}: {j['bound_tg']:.2f}x; reached {100 * j['share_of_bound']:.0f}% of it")
    if "ratio_pp" in j:
        lines.append(f"prompt ratio ours/stock: {j['ratio_pp']:.2f}x")
    return "\n".join(lines)


def render_plot(res: BenchResult, path: str | os.PathLike) -> None:
    """Paper-style bars: tokens/s per side, prompt and decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.sides)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in ((axes[0], "pp", f"prompt (pp{res.n_prompt})"),
                           (axes[1], "tg", f"decode (tg{res.n_gen})")):
        vals = [res.sides[n].summary()[f"{key}_tps"] for n in names]
        sds = [res.sides[n].summary()[f"{key}_sd"] for n in names]
        bars = ax.bar(names, vals, yerr=sds, capsize=4,
                      color=["#d62728" if n == "ours" else "#888888" for n in names])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{Path(res.model).name}, VRAM budget {res.budget_bytes / GiB:.1f} GiB, {res.threads} threads")
    fig.tight_layout()
    tmp = Path(str(path) + ".part.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json_atomic(obj, path: str | os.PathLike) -> None:
    """No half-written file: written beside, then renamed over."""
    tmp = Path(str(path) + ".part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_json(res: BenchResult | DecodeProfile, path: str | os.PathLike) -> None:
    _write_json_atomic(res.to_json(), path)


# --- budget sweep ---------------------------------------------------------------------------------


def run_sweep(model: str, stock_model: str | None, budgets: list[str], **kw) -> list[BenchResult]:
    """run_bench at each budget in turn ("0", "10%", "8GiB", ...)."""
    if not budgets:
        raise ValueError("--sweep needs at least one budget")
    return [run_bench(model, stock_model, b, **kw) for b in budgets]


def render_sweep_table(results: list[BenchResult]) -> str:
    r0 = results[0]
    lines = [f"model: {r0.model} ({r0.weight_bytes / GiB:.2f} GiB of weights), {r0.threads} threads, "
             f"tg{r0.n_gen}, {r0.repetitions} repetitions", "",
             "| budget | share of weights | stock (its best way) | stock t/s | ours placement | ours t/s | ratio | bound |",
             "|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in results:
        j = r.to_json()
        st, ours = r.sides.get("stock"), r.sides.get("ours")
        lines.append(f"| {r.budget_bytes / GiB:.2f} GiB | {100 * r.budget_bytes / r.weight_bytes:.0f}% | "
                     f"{st.strategy if st else '-'} | {st.tg_tps if st else 0:.2f} | "
                     f"{ours.strategy if ours else '-'} | {ours.tg_tps if ours else 0:.2f} | "
                     f"{j.get('ratio_tg', 0):.2f}x | {j.get('bound_tg', 0):.2f}x |")
    return "\n".join(lines)


def render_sweep_plot(results: list[BenchResult], path: str | os.PathLike) -> None:
    """Decode tokens/s against the VRAM budget, stock and ours, ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r.budget_bytes / r.weight_bytes for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("stock", "#888888"), ("ours", "#d62728")):
        ys = [r.sides[name].tg_tps if name in r.sides else float("nan") for r in results]
        ax.plot(x, ys, "o-", color=color, label=name)
    for r, xi in zip(results, x):
        j = r.to_json()
        if "ratio_tg" in j:
            ax.annotate(f"{j['ratio_tg']:.1f}x", (xi, r.sides["ours"].tg_tps), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("VRAM budget, % of the model's weights")
    ax.set_ylabel(f"decode tokens/s (tg{results[0].n_gen})")
    ax.set_title(f"{Path(results[0].model).name}: decode speed under a VRAM budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(path) + ".part.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def load_results(path: str | os.PathLike) -> list[BenchResult]:
    """BenchResults back from write_json / write_sweep_json output (to re-render a table or plot
    of a run made elsewhere, e.g. on the GPU machine)."""
    data = json.loads(Path(path).read_text())
    out = []
    for d in data if isinstance(data, list) else [data]:
        sides = {}
        for name in ("stock", "stock_alt", "ours"):
            if name not in d:
                continue
            x = d[name]
            pl = x.get("placement")
            sides[name] = SideResult(name, x["binary"], x["model"], x["args"], x["strategy"], x["gpu_bytes"],
                                     x.get("decode_bytes", 0), x.get("cpu_bytes_per_token", 0),
                                     x.get("gpu_bytes_per_token", 0), Placement(**pl) if pl else None,
                                     list(x["pp_samples"]), list(x["tg_samples"]))
        out.append(BenchResult(d["model"], d["budget_bytes"], d["threads"], d["n_prompt"], d["n_gen"],
                               d["repetitions"], d["weight_bytes"], sides))
    return out


def write_sweep_json(results: list[BenchResult], path: str | os.PathLike) -> None:
    _write_json_atomic([r.to_json() for r in results], path)


# --- quality: sparse against dense on the same file ---------------------------------------------


@dataclass
class SparseQuality:
    n_tokens: int
    free_match: float         # greedy texts generated independently: share of positions equal
    first_difference: int     # first position where they differ (n_tokens if none)
    forced_match: float       # sparse's greedy choice along the dense text: share equal to dense's
    logit_rel_err: float      # max |sparse - dense| / max |dense| over the dense text's logits
    computed_share: float     # FFN rows the sparse engine computed per token (mean over layers)

    def line(self) -> str:
        return (f"{self.n_tokens} greedy tokens: free-running texts equal at {self.free_match:.1%} of positions "
                f"(first difference at {self.first_difference}); along the dense text sparse picks the same "
                f"token {self.forced_match:.1%} of the time, max |dlogit|/max|logit| {self.logit_rel_err:.2e}; "
                f"rows computed {self.computed_share:.3f}")


def _last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token, copied out of the context."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def sparse_quality(path: str, prompt: str = "The history of the language", n_tokens: int = 128,
                   n_threads: int | None = None, **kw) -> SparseQuality:
    """Greedy decoding of one file, sparse (its predictors) against dense (every neuron)."""
    from . import Llama

    def open_(sparse: bool):
        return Llama(str(path), sparse=sparse, n_ctx=n_tokens + 64, n_threads=n_threads or os.cpu_count(),
                     verbose=False, **kw)

    dense, sparse = open_(False), open_(True)
    prompt_toks = dense.tokenize(prompt.encode())
    # free-running
    texts = []
    for llm in (dense, sparse):
        llm.reset()
        llm.eval(prompt_toks)
        out = []
        for _ in range(n_tokens):
            out.append(int(_last_logits(llm).argmax()))
            llm.eval([out[-1]])
        texts.append(out)
    same = np.array(texts[0]) == np.array(texts[1])
    first = int(np.argmin(same)) if not same.all() else n_tokens
    # teacher-forced along the dense text
    sparse.reset()
    sparse.reset_sparse_stats()
    sparse.eval(prompt_toks)
    dense.reset()
    dense.eval(prompt_toks)
    agree, err, top = 0, 0.0, 0.0
    for t in texts[0]:
        ld, ls = _last_logits(dense), _last_logits(sparse)
        agree += int(ld.argmax() == ls.argmax())
        err, top = max(err, float(np.abs(ld - ls).max())), max(top, float(np.abs(ld).max()))
        dense.eval([t])
        sparse.eval([t])
    share = float(np.mean([s.computed_share for s in sparse.sparse_stats()]))
    dense.close()
    sparse.close()
    return SparseQuality(n_tokens, float(same.mean()), first, agree / n_tokens, err / max(top, 1e-30), share)


# --- profile: where a decoded token's time goes ---------------------------------------------------


@dataclass
class DecodeProfile:
    """Ours through the Python API, one token per decode: the token's wall time, and the part of
    it the CPU sparse FFN kernel took (its own clock, patches/0010) with the bytes it read."""

    model: str
    budget_bytes: int
    threads: int
    n_tokens: int
    token_ms: float          # wall time per decoded token (llama_decode + greedy pick)
    layers: list = field(default_factory=list)      # LayerStats per layer, over the n_tokens
    placement: list = field(default_factory=list)   # LayerPlacement per layer

    @property
    def cpu_ffn_ms(self) -> float:
        """Of a token's time, inside the CPU sparse FFN kernel, all layers."""
        return sum(s.cpu_ns for s in self.layers) / 1e6 / self.n_tokens

    @property
    def cpu_ffn_bytes(self) -> float:
        """Bytes of FFN rows the CPU kernel read per token."""
        return sum(s.cpu_bytes for s in self.layers) / self.n_tokens

    @property
    def cpu_threads(self) -> int:
        """Threads that kernel ran with (0: it never ran)."""
        return max((s.cpu_threads for s in self.layers), default=0)

    @property
    def rest_ms(self) -> float:
        """Everything but the CPU FFN: attention, predictors, output, GPU work, hand-offs."""
        return self.token_ms - self.cpu_ffn_ms

    @property
    def cpu_gbps(self) -> float:
        return self.cpu_ffn_bytes / (self.cpu_ffn_ms * 1e6) if self.cpu_ffn_ms else 0.0

    def render(self) -> str:
        n_cpu = sum(1 for s in self.layers if s.cpu_threads)
        lines = [f"profile: {self.model}, VRAM budget {self.budget_bytes / GiB:.2f} GiB, {self.threads} threads, "
                 f"{self.n_tokens} decoded tokens",
                 f"per token: {self.token_ms:.2f} ms ({1e3 / self.token_ms:.2f} t/s)",
                 f"  CPU sparse FFN: {self.cpu_ffn_ms:.2f} ms ({self.cpu_ffn_ms / self.token_ms:.0%}) in {n_cpu}/"
                 f"{len(self.layers)} layers, {self.cpu_ffn_bytes / 1e6:.1f} MB of rows at {self.cpu_gbps:.1f} GB/s, "
                 f"{self.cpu_threads} threads",
                 f"  the rest: {self.rest_ms:.2f} ms (attention, predictors, output, GPU work, CPU-GPU hand-offs, "
                 "the Python loop's greedy pick)",
                 "", "| layer | rows computed | CPU ms/token | CPU GB/s | GPU rows |", "|---:|---:|---:|---:|---:|"]
        gpu = {p.layer: p.gpu_rows for p in self.placement}
        for s in self.layers:
            lines.append(f"| {s.layer} | {s.computed_share:.3f} | {s.cpu_ms_per_token:.3f} | {s.cpu_gbps:.1f} | "
                         f"{gpu.get(s.layer, 0)} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("model", "budget_bytes", "threads", "n_tokens", "token_ms",
                                            "cpu_ffn_ms", "cpu_ffn_bytes", "cpu_threads")}
        d["rest_ms"], d["cpu_gbps"] = self.rest_ms, self.cpu_gbps
        d["layers"] = [asdict(s) for s in self.layers]
        d["placement"] = [asdict(p) for p in self.placement]
        return d


def profile_decode(path: str, budget: str | int = 0, n_threads: int | None = None, n_prompt: int = 64,
                   n_gen: int = 64, prompt: str = "The history of the language") -> DecodeProfile:
    """Decode ``n_gen`` tokens greedily after an ``n_prompt``-token prompt and split the time
    per token into the CPU sparse FFN (the kernel's own counters) and the rest."""
    import time

    from . import Llama

    if n_gen < 1 or n_prompt < 1:
        raise ValueError("the profile needs at least one prompt and one decoded token")
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such model file")
    threads = n_threads or os.cpu_count() or 1
    llm = Llama(str(path), vram_budget=budget, n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                n_batch=max(n_prompt, 8), verbose=False)
    try:
        if llm.sparse_mode == "stock":
            raise ValueError(f"{path} has no sparse layout: nothing to profile (pi-convert makes one)")
        toks = llm.tokenize(prompt.encode())
        toks = (toks * (n_prompt // max(len(toks), 1) + 1))[:n_prompt]
        llm.reset()
        llm.eval(toks)
        llm.reset_sparse_stats()
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([int(_last_logits(llm).argmax())])
        wall = time.perf_counter() - t0
        layers, placement = llm.sparse_stats(), llm.placement()
    finally:
        llm.close()
    return DecodeProfile(str(path), int(llm.vram_budget), threads, n_gen, 1e3 * wall / n_gen, layers, placement)
