"""pi-eval: what sparsity costs in quality, on text calibration never saw. Perplexity of our file
computed sparse (its predictors choose the rows) and dense (every row), and of its stock twin;
per layer, the predictors' recall and precision against the model's true firing (a numpy
forward pass of the file's own weights, quantized ones dequantized). Run it on an F16 file and on
its Q4_0 copy to see what 4 bits cost (docs/NOTES.md).

Perplexity: the text's tokens cut into windows of ``n_ctx`` (each led by BOS), every token after
the first of a window scored, one eval per window through the engine (powerinfer_gguf.Llama).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .predictor import Quality

_LICENSES = Path("/usr/share/common-licenses")


@dataclass
class EvalResult:
    model: str
    stock: str | None
    text: str                # where the text came from
    n_tokens: int            # tokens scored per perplexity
    ppl_sparse: float
    ppl_dense: float
    ppl_stock: float | None
    layers: list[Quality] = field(default_factory=list)  # empty when recall_tokens == 0


def default_text() -> tuple[str, str]:
    """Text calibration never saw (pi-convert's default is Python's documentation): the system's
    license texts, else llama.cpp's own documentation from the sdist set-up unpacked."""
    files = sorted(p for p in _LICENSES.iterdir() if p.is_file()) if _LICENSES.is_dir() else []
    where = str(_LICENSES)
    if not files:
        from .build import stock_llama_source
        docs = stock_llama_source() / "docs"
        files, where = sorted(docs.rglob("*.md")), f"{docs}/**/*.md"
    if not files:
        raise FileNotFoundError("no default evaluation text found: give --text FILE")
    return "\n\n".join(p.read_text(errors="replace") for p in files), where


def _windows(ids: list[int], n_tokens: int, n_ctx: int, bos: int) -> list[list[int]]:
    body = n_ctx - 1
    n_win = min(len(ids) // body, max(1, math.ceil(n_tokens / body)))
    if n_win < 1:
        raise ValueError(f"evaluation text too short: {len(ids)} tokens, need at least {body}")
    starts = np.linspace(0, len(ids) - body, n_win).astype(int)
    return [[bos] + ids[s:s + body] for s in starts]


def perplexity(path, windows: list[list[int]], n_ctx: int, threads: int | None, upstream: bool = False,
               **kw) -> float:
    """exp(mean negative log-likelihood) of every token after a window's first."""
    if upstream:
        from llama_cpp import Llama
    else:
        from . import Llama
    llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                **({"n_threads": threads} if threads else {}), **kw)
    nll, n = 0.0, 0
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
    finally:
        llm.close()
    return math.exp(nll / n)


def _check(model: Path, stock: Path | None, text_file: Path | None, n_tokens: int, n_ctx: int,
           recall_tokens: int) -> None:
    import gguf

    from . import format as fmt
    for p in [model] + ([stock] if stock else []) + ([text_file] if text_file else []):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    if n_ctx < 16 or n_tokens < n_ctx or recall_tokens < 0:
        raise ValueError(f"need n_ctx >= 16, tokens >= n_ctx and recall tokens >= 0 "
                         f"(got {n_ctx}, {n_tokens}, {recall_tokens})")
    for p, ours in ((model, True), (stock, False)):
        if p is None:
            continue
        try:
            r = gguf.GGUFReader(p)
        except Exception:  # noqa: BLE001 - any parse failure is "not a GGUF" to the user
            raise ValueError(f"{p}: not a readable GGUF") from None
        if ours and not (fmt.Keys.SPARSE in r.fields and r.fields[fmt.Keys.SPARSE].contents()):
            raise ValueError(f"{p}: not one of our sparse files ({fmt.Keys.SPARSE} absent or false); give it as --stock")
        arch = r.fields["general.architecture"].contents() if "general.architecture" in r.fields else None
        if ours and arch != "llama":
            raise ValueError(f"{p}: architecture {arch!r}: pi-eval reads llama-family files")


def evaluate(model, stock=None, text_file=None, n_tokens: int = 2048, n_ctx: int = 256,
             recall_tokens: int = 512, threads: int | None = None, progress=None) -> EvalResult:
    from llama_cpp import Llama as _Upstream

    from .predictor import evaluate_file

    say = progress or (lambda m: None)
    model, stock = Path(model), Path(stock) if stock else None
    text_file = Path(text_file) if text_file else None
    _check(model, stock, text_file, n_tokens, n_ctx, recall_tokens)
    text, where = (text_file.read_text(errors="replace"), str(text_file)) if text_file else default_text()
    vocab = _Upstream(str(model), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    windows = _windows(ids, n_tokens, n_ctx, vocab.token_bos())
    n = sum(len(w) - 1 for w in windows)
    say(f"{len(windows)} windows of {n_ctx} tokens ({n} scored) from {where}")
    ppl_sparse = perplexity(model, windows, n_ctx, threads)
    say(f"sparse perplexity {ppl_sparse:.4f}")
    ppl_dense = perplexity(model, windows, n_ctx, threads, sparse=False)
    say(f"dense perplexity {ppl_dense:.4f}")
    ppl_stock = perplexity(stock, windows, n_ctx, threads, upstream=True) if stock else None
    layers = evaluate_file(model, text, recall_tokens, seq_len=min(n_ctx, 128)) if recall_tokens else []
    return EvalResult(str(model), str(stock) if stock else None, where, n, ppl_sparse, ppl_dense, ppl_stock, layers)


def render(r: EvalResult) -> str:
    lines = [f"{r.model}: {r.n_tokens} tokens of {r.text}",
             "",
             "| run | perplexity | x dense |",
             "|---|---:|---:|",
             f"| ours, sparse (predictors) | {r.ppl_sparse:.4f} | {r.ppl_sparse / r.ppl_dense:.4f} |",
             f"| ours, dense (every row) | {r.ppl_dense:.4f} | 1.0000 |"]
    if r.ppl_stock is not None:
        lines.append(f"| stock twin ({r.stock}) | {r.ppl_stock:.4f} | {r.ppl_stock / r.ppl_dense:.4f} |")
    if r.layers:
        lines += ["", "| layer | firing | predicted | recall | precision |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {i} | {q.actual:.3f} | {q.predicted:.3f} | {q.recall:.4f} | {q.precision:.3f} |"
                  for i, q in enumerate(r.layers)]
        mean = lambda f: float(np.mean([f(q) for q in r.layers]))  # noqa: E731
        lines.append(f"| mean | {mean(lambda q: q.actual):.3f} | {mean(lambda q: q.predicted):.3f} | "
                     f"{mean(lambda q: q.recall):.4f} | {mean(lambda q: q.precision):.3f} |")
    return "\n".join(lines)
