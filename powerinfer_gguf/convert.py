"""pi-convert: HF checkpoint -> GGUF with activation profile, predictors and placement metadata.

Stages: read (hf.py) -> profile calibration text layer by layer (profile.py) -> fit one predictor
per layer (predictor.py) -> rank neurons hot to cold and permute gate/up rows, down columns and
predictor outputs alike (the model's function is unchanged) -> write our GGUF and, with --stock,
a plain llama.cpp GGUF of the same permuted weights. Model families are classes registered by HF
architecture name, as in llama.cpp's converter (adding one is a new class, not edits here).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import format as fmt
from .forward import Hparams
from .hf import (Checkpoint, CheckpointError, Vocab, hf_tensor_name, permute_qk_to_gguf, read_tokenizer,
                 reject_lfs_pointer)
from .layout import OUTTYPES, GGUFOut, file_type, llama_layer_plan, sparse_plan, tensor_name, write_sparse_keys
from .outputs import Staged, check_outputs, staged

_FAMILIES: dict[str, type["ModelFamily"]] = {}


def register(*architectures: str):
    def wrap(cls):
        for a in architectures:
            _FAMILIES[a] = cls
        return cls
    return wrap


class ModelFamily:
    """How one HF model family maps onto llama.cpp's names, shapes and metadata."""

    gguf_arch = "llama"

    def __init__(self, ckpt: Checkpoint, act_override: str | None = None):
        self.ckpt = ckpt
        self.hp = self.hparams(ckpt.config, act_override)

    @staticmethod
    def for_checkpoint(ckpt: Checkpoint, act_override: str | None = None) -> "ModelFamily":
        archs = ckpt.config.get("architectures") or [ckpt.config.get("model_type", "?")]
        for a in archs:
            if a in _FAMILIES:
                return _FAMILIES[a](ckpt, act_override)
        raise CheckpointError(f"unsupported architecture {archs[0]} (supported: {', '.join(sorted(_FAMILIES))})")

    def hparams(self, cfg: dict, act_override: str | None) -> Hparams:
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the GGUF's dense part (llama.cpp names, numpy shapes), in file order."""
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        raise NotImplementedError


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaFamily(ModelFamily):
    """LLaMA / Mistral layout; ReGLU (relu), dReLU or SwiGLU (silu) FFN."""

    # HF hidden_act spellings -> ours (format.ACTIVATIONS)
    ACTS = {"relu": "relu", "reglu": "relu", "drelu": "drelu", "silu": "silu", "swish": "silu", "swiglu": "silu"}

    def hparams(self, cfg: dict, act_override: str | None) -> Hparams:
        def need(key: str):
            if key not in cfg:
                raise CheckpointError(f"{self.ckpt.dir / 'config.json'}: missing key {key!r}")
            return cfg[key]

        act_hf = act_override or need("hidden_act")
        if act_hf not in self.ACTS:
            raise CheckpointError(f"unknown activation {act_hf!r} in config.json "
                                  f"(known: {', '.join(sorted(self.ACTS))})")
        n_head = int(need("num_attention_heads"))
        d = int(need("hidden_size"))
        if n_head < 1 or d % n_head or (d // n_head) % 2:
            raise CheckpointError(f"config.json: hidden_size {d} does not split into {n_head} even-sized heads")
        n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
        if n_head % n_head_kv:
            raise CheckpointError(f"config.json: {n_head} heads do not group into {n_head_kv} KV heads")
        return Hparams(n_vocab=int(need("vocab_size")), n_embd=d, n_ff=int(need("intermediate_size")),
                       n_layer=int(need("num_hidden_layers")), n_head=n_head, n_head_kv=n_head_kv,
                       act=self.ACTS[act_hf], rope_theta=float(cfg.get("rope_theta", 10000.0)),
                       rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                       n_ctx_train=int(cfg.get("max_position_embeddings", 4096)))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        import gguf

        T, hp = gguf.MODEL_TENSOR, self.hp
        shapes = {tensor_name(T.TOKEN_EMBD): (hp.n_vocab, hp.n_embd), tensor_name(T.OUTPUT_NORM): (hp.n_embd,)}
        if self.ckpt.has("lm_head.weight") or not self.ckpt.config.get("tie_word_embeddings", False):
            shapes[tensor_name(T.OUTPUT)] = (hp.n_vocab, hp.n_embd)
        for il in range(hp.n_layer):
            shapes.update(llama_layer_plan(hp, il))
        return shapes

    def check(self) -> None:
        """Every tensor present with the shape config.json implies (before anything is written)."""
        for name, shape in self.expected_shapes().items():
            hf = hf_tensor_name(name)
            if not self.ckpt.has(hf):
                raise CheckpointError(f"{self.ckpt.dir}: tensor {hf!r} is missing")
            got = tuple(self.ckpt.shape(hf))
            if got != shape:
                raise CheckpointError(f"{self.ckpt.dir}: shape mismatch: {hf} is {list(got)}, "
                                      f"config.json implies {list(shape)}")

    def tensor(self, name: str) -> np.ndarray:
        """A tensor in llama.cpp's conventions (Q/K rows permuted for its RoPE), float32."""
        w = self.ckpt.get(hf_tensor_name(name))
        if name.endswith("attn_q.weight"):
            w = permute_qk_to_gguf(w, self.hp.n_head)
        elif name.endswith("attn_k.weight"):
            w = permute_qk_to_gguf(w, self.hp.n_head_kv)
        if not np.all(np.isfinite(w)):
            raise CheckpointError(f"{self.ckpt.dir}: tensor {hf_tensor_name(name)} holds NaN or Inf")
        return w

    def write_kv(self, w, name: str) -> None:
        fmt.write_llama_kv(w, self.hp, name)


# ---------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    layer: int
    firing: float
    hot_mass: float         # activation share of the hottest 25% of neurons
    rank: int = 0
    recall: float = 0.0     # held-out
    precision: float = 0.0  # held-out
    predicted: float = 0.0  # held-out share of neurons predicted active
    predictor_bytes: int = 0


@dataclass
class ConvertReport:
    output: Path
    stock: Path | None
    hparams: Hparams
    sparse: bool
    calib_tokens: int
    heldout_tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    stock_bytes: int = 0
    ffn_bytes: int = 0

    def summary(self) -> str:
        hp = self.hparams
        lines = [f"{self.output}: {hp.n_layer} layers, n_embd {hp.n_embd}, n_ff {hp.n_ff}, act {hp.act}, "
                 f"{self.bytes / 2**30:.2f} GiB" + (f"; stock twin {self.stock} ({self.stock_bytes / 2**30:.2f} GiB)" if self.stock else "")]
        if self.sparse:
            lines.append(f"profiled {self.calib_tokens} calibration tokens, predictors checked on {self.heldout_tokens} held-out tokens")
            lines.append("layer  firing  hot25%  rank  recall  precision  predicted  pred-MiB")
            for r in self.layers:
                lines.append(f"{r.layer:5d}  {r.firing:6.3f}  {r.hot_mass:6.3f}  {r.rank:4d}  {r.recall:6.4f}  "
                             f"{r.precision:9.3f}  {r.predicted:9.3f}  {r.predictor_bytes / 2**20:8.2f}")
            pb = sum(r.predictor_bytes for r in self.layers)
            lines.append(f"mean recall {np.mean([r.recall for r in self.layers]):.4f}, min {min(r.recall for r in self.layers):.4f}; "
                         f"predictors {pb / 2**20:.1f} MiB = {pb / max(self.ffn_bytes, 1):.1%} of the FFN weights")
        else:
            lines.append(f"activation {hp.act}: dense only (no exact zeros to exploit; the file says so)")
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _vocab_only_gguf(family: ModelFamily, vocab: Vocab, path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(path, family.gguf_arch)
    family.write_kv(w, "vocab")
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def make_tokenizer(family: ModelFamily, vocab: Vocab, tmpdir: Path) -> Callable[[str], list[int]]:
    """llama.cpp's own tokenizer for this vocabulary (a vocab-only GGUF through llama_cpp): the
    calibration tokens are exactly those the model will see at run time."""
    import llama_cpp

    p = tmpdir / "vocab.gguf"
    _vocab_only_gguf(family, vocab, p)
    llm = llama_cpp.Llama(str(p), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    return tokenize


def _inputs(ckpt: Checkpoint, calib, predictor_dir) -> list[Path]:
    """Every file the conversion reads: no output may be one of them."""
    files = list(ckpt.files)
    if calib:
        files.append(Path(calib))
    if predictor_dir is not None:
        files += sorted(Path(predictor_dir).glob("*"))
    return files


def _check_request(ckpt: Checkpoint, family: ModelFamily, vocab: Vocab, *, outtype: str, recall: float,
                   predictor_rank: int | None, predictor_dir, calib) -> None:
    """Arguments against the checkpoint, before any slow work."""
    hp = family.hp
    if len(vocab.tokens) != hp.n_vocab:
        raise CheckpointError(f"{ckpt.dir}: tokenizer has {len(vocab.tokens)} tokens, config.json says "
                              f"vocab_size {hp.n_vocab}")
    if predictor_rank is not None:
        top = min(hp.n_embd, hp.n_ff)  # a rank above both sides adds bytes and no information
        if not 1 <= predictor_rank <= top:
            raise ValueError(f"--predictor-rank {predictor_rank} is out of range: this model takes 1 to {top}")
    if calib is not None and not Path(calib).is_file():
        raise FileNotFoundError(f"{calib}: no such calibration text file")
    if predictor_dir is not None:
        for f in sorted(Path(predictor_dir).glob("model_*.pt")):
            reject_lfs_pointer(f)


@dataclass
class _Profiled:
    """What profiling and predictor fitting give the writer, per layer (neurons hot to cold)."""

    orders: list[np.ndarray] = field(default_factory=list)
    freqs: list[np.ndarray] = field(default_factory=list)
    predictors: list = field(default_factory=list)


def _held_out(seqs: list, share: float) -> set[int]:
    n_held = max(1, int(round(len(seqs) * share))) if len(seqs) > 1 else 0
    return set(np.linspace(0, len(seqs) - 1, n_held).astype(int).tolist()) if n_held else set()


def _calibration(family: ModelFamily, vocab: Vocab, calib, calib_tokens: int, seq_len: int, tmp: Path) -> list:
    from .profile import calibration_sequences, default_corpus

    tokenize = make_tokenizer(family, vocab, tmp)
    text = Path(calib).read_text(errors="replace") if calib else default_corpus()
    return calibration_sequences(tokenize, text, calib_tokens, seq_len, vocab.bos_id if vocab.add_bos else None)


def _profile_and_fit(family: ModelFamily, seqs: list, held_ids: set[int], report: ConvertReport, *,
                     recall: float, predictor_rank, predictor_dir, predictor_steps: int, outtype: str,
                     progress: bool) -> _Profiled:
    """Profile every layer; fit (or import) its predictor; rank its neurons hot to cold."""
    from .predictor import fit_layer, load_powerinfer_predictor, quality
    from .profile import profile
    from .synth import hot_mass_of

    hp = family.hp
    out = _Profiled()
    t_fit = 0.0

    def visit(obs) -> None:
        nonlocal t_fit
        held = np.isin(obs.seq_id, list(held_ids))
        train = ~held if held.any() else np.ones_like(held)
        held = held if held.any() else train
        counts = obs.active[train].sum(axis=0)
        freq = counts / max(train.sum(), 1)
        # hot -> cold; ties keep the original order, so the permutation is deterministic
        order = np.argsort(-freq, kind="stable")
        out.orders.append(order)
        out.freqs.append(freq[order].astype(np.float32))
        rep = LayerReport(obs.layer, float(obs.active.mean()), hot_mass_of(counts, 0.25))
        t1 = time.time()
        if predictor_dir is not None:
            p = load_powerinfer_predictor(predictor_dir, obs.layer, hp.n_embd, hp.n_ff)
            q = quality(p.predict(obs.ffn_in[held]), obs.active[held])
        else:
            fit = fit_layer(obs.ffn_in[train], obs.gate[train], obs.active[train],
                            obs.ffn_in[held], obs.active[held], obs.w_gate,
                            recall=recall, rank=predictor_rank, train_steps=predictor_steps)
            p, q = fit.predictor, fit.heldout
        t_fit += time.time() - t1
        out.predictors.append(p.permuted(order))
        rep.rank, rep.recall, rep.precision, rep.predicted = p.rank, q.recall, q.precision, q.predicted
        rep.predictor_bytes = (p.fc1.size + p.fc2.size) * (4 if outtype == "f32" else 2)
        report.layers.append(rep)

    t0 = time.time()
    profile(family.tensor, hp, seqs, visit, progress)
    report.seconds["profile"] = time.time() - t0 - t_fit
    report.seconds["predictors"] = t_fit
    return out


def _begin_outputs(outs: list[tuple[GGUFOut, bool]], family: ModelFamily, vocab: Vocab, report: ConvertReport,
                   recall: float, prof: _Profiled, outtype: str, name: str) -> None:
    """Keys and tensor plans of our file and (ours False) the stock twin."""
    dense = list(family.expected_shapes().items())
    for out, ours in outs:
        family.write_kv(out.w, name)
        vocab.write(out.w)
        out.w.add_file_type(file_type(outtype))
        if ours:
            _write_our_kv(out.w, report, recall, prof.predictors)
        else:
            out.w.add_string(fmt.Keys.STOCK_TWIN, f"stock llama.cpp twin of {report.output.name}: the same "
                             "(permuted) weights; stock llama.cpp computes SwiGLU for the llama "
                             "architecture, so for relu/drelu models it is a speed reference")
        sparse = ours and report.sparse
        out.begin(sparse_plan(dense, [p.rank for p in prof.predictors]) if sparse else dense)


def _stream_tensors(outs: list[tuple[GGUFOut, bool]], family: ModelFamily, sparse: bool, prof: _Profiled,
                    progress: bool) -> None:
    """Each tensor read once (FFN neurons in hot-to-cold order) and written to every output."""
    from tqdm import tqdm

    for name in tqdm(family.expected_shapes(), desc="write", unit="tensor", disable=not progress):
        w = family.tensor(name)
        is_ffn = name.startswith("blk.") and name.split(".")[2] in ("ffn_gate", "ffn_up", "ffn_down")
        il = int(name.split(".")[1]) if is_ffn else -1
        if sparse and is_ffn:
            w = w[:, prof.orders[il]] if name.endswith("ffn_down.weight") else w[prof.orders[il]]
        for out, ours in outs:
            if ours and sparse and name.endswith("ffn_down.weight"):
                p = prof.predictors[il]
                out.put_sparse_ffn_down(il, w, p.fc1, p.fc2, p.threshold, prof.freqs[il])
            else:
                out.put(name, w)


def _write(staged: Staged, output: Path, stock: Path | None, family: ModelFamily, vocab: Vocab,
           report: ConvertReport, recall: float, prof: _Profiled, outtype: str, name: str,
           progress: bool) -> None:
    """Our file and the twin, both to temporaries; they replace their targets together at the end."""
    targets = [(output, True)] + ([(stock, False)] if stock else [])
    outs = [(GGUFOut(staged.file(t), family.gguf_arch, outtype), ours) for t, ours in targets]
    try:
        _begin_outputs(outs, family, vocab, report, recall, prof, outtype, name)
        _stream_tensors(outs, family, report.sparse, prof, progress)
        for out, _ in outs:
            out.close()
    except BaseException:
        for out, _ in outs:
            out.abandon()
        raise
    staged.commit()


def convert(hf_dir: str | os.PathLike, output: str | os.PathLike, *, calib: str | os.PathLike | None = None,
            calib_tokens: int = 2048, outtype: str = "f16", predictor_rank: int | None = None,
            predictor_dir: str | os.PathLike | None = None, stock: str | os.PathLike | None = None,
            recall: float = 0.99, act: str | None = None, heldout_share: float = 0.2,
            seq_len: int = 128, predictor_steps: int = 0, force: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> ConvertReport:
    """The whole conversion; see the module doc. Every argument and output path is checked before
    the slow work; outputs appear whole or not at all (``force``: an existing one is replaced)."""
    t_all = time.time()
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if not 0.5 <= recall < 1:
        raise ValueError(f"recall target must be in [0.5, 1), got {recall}")
    if predictor_rank is not None and predictor_dir is not None:
        raise ValueError("--predictor-rank and --predictor-dir exclude each other")
    output = Path(output)
    stock = Path(stock) if stock else None
    t0 = time.time()
    ckpt = Checkpoint(hf_dir)
    family = ModelFamily.for_checkpoint(ckpt, act)
    family.check()
    vocab = read_tokenizer(hf_dir)
    _check_request(ckpt, family, vocab, outtype=outtype, recall=recall, predictor_rank=predictor_rank,
                   predictor_dir=predictor_dir, calib=calib)
    check_outputs([output, stock], _inputs(ckpt, calib, predictor_dir), force=force)
    hp = family.hp
    report = ConvertReport(output, stock, hp, hp.act in ("relu", "drelu"), 0, 0)
    report.seconds["read"] = time.time() - t0
    prof = _Profiled()
    with tempfile.TemporaryDirectory(prefix="pi-convert-") as tmp, staged() as st:
        if report.sparse:
            t0 = time.time()
            seqs = _calibration(family, vocab, calib, calib_tokens, seq_len, Path(tmp))
            held_ids = _held_out(seqs, heldout_share)
            report.calib_tokens = sum(len(s) for i, s in enumerate(seqs) if i not in held_ids)
            report.heldout_tokens = sum(len(s) for i, s in enumerate(seqs) if i in held_ids)
            if not held_ids:
                log("warning: one calibration sequence only: predictor quality is measured on the training tokens")
            report.seconds["tokenize"] = time.time() - t0
            prof = _profile_and_fit(family, seqs, held_ids, report, recall=recall, predictor_rank=predictor_rank,
                                    predictor_dir=predictor_dir, predictor_steps=predictor_steps,
                                    outtype=outtype, progress=progress)
        t0 = time.time()
        _write(st, output, stock, family, vocab, report, recall, prof, outtype, Path(hf_dir).name, progress)
        report.seconds["write"] = time.time() - t0
    report.ffn_bytes = hp.n_layer * 3 * hp.n_embd * hp.n_ff * (4 if outtype == "f32" else 2)
    report.bytes = output.stat().st_size
    report.stock_bytes = stock.stat().st_size if stock else 0
    report.seconds["total"] = time.time() - t_all
    return report


def _write_our_kv(w, report: ConvertReport, recall: float, predictors: list) -> None:
    K = fmt.Keys
    w.add_uint32(K.FORMAT_VERSION, fmt.FORMAT_VERSION)
    if not report.sparse:
        w.add_bool(K.SPARSE, False)
        return
    write_sparse_keys(w, predictors[0].act, recall, [r.recall for r in report.layers],
                      [r.precision for r in report.layers], report.calib_tokens)
