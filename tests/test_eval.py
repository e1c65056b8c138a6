"""pi-eval (issue 16): perplexity of our file sparse and dense and of its twin, per-layer recall and
precision; the perplexity against a numpy forward pass of the same weights."""
from __future__ import annotations

import json
import math

import numpy as np

from conftest import TOKENS, assert_one_line_error, run_cli
from powerinfer_gguf.evaluate import evaluate, perplexity
from powerinfer_gguf.forward import forward, gguf_weights

TEXT = ("The licence grants every person who receives a copy the right to use, study, change and "
        "share the program, provided that the same freedoms pass on with every copy they make. ") * 40


def test_perplexity_is_the_numpy_forward_pass(tiny_pi):
    """exp of the mean negative log-likelihood of each token after a window's first, as numpy
    computes it from the same weights (dense)."""
    res, ours, _ = tiny_pi
    window = list(TOKENS)
    logits = forward(gguf_weights(ours), res.hparams, np.array(window)).astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = math.exp(float(np.mean(logz[:-1] - logits[np.arange(len(window) - 1), window[1:]])))
    got = perplexity(ours, [window], 64, 2, sparse=False)
    assert abs(got / want - 1) < 1e-3, (got, want)


def test_eval_ours_and_twin(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    r = evaluate(ours, twin, text, n_tokens=256, n_ctx=64, recall_tokens=128, threads=2)
    assert r.n_tokens == 5 * 63 and r.text == str(text)
    # the twin is the same weights (neurons permuted): the same perplexity as our dense path
    assert abs(r.ppl_stock / r.ppl_dense - 1) < 1e-3
    # predictors at ~99% recall move the perplexity little, and never to nonsense
    assert np.isfinite(r.ppl_sparse) and abs(r.ppl_sparse / r.ppl_dense - 1) < 0.1
    assert len(r.layers) == 4 and all(0.8 < q.recall <= 1 and 0 < q.precision <= 1 for q in r.layers)


def test_cli_table_json_and_errors(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    js = tmp_path / "e.json"
    args = ["--text", text, "--tokens", 128, "--ctx", 64, "--recall-tokens", 0, "-t", 2]
    r = run_cli("eval", ours, *args, "--json", js)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ours, sparse (predictors)" in r.stdout and "stock twin" not in r.stdout
    d = json.loads(js.read_text())
    assert d["ppl_stock"] is None and d["layers"] == [] and d["ppl_dense"] > 1
    assert_one_line_error(run_cli("eval", ours, *args, "--json", js), "exists")
    assert_one_line_error(run_cli("eval", tmp_path / "none.gguf", *args), "no such file")
    assert_one_line_error(run_cli("eval", twin, *args), "give it as --stock")
    assert_one_line_error(run_cli("eval", ours, "--stock", text, *args), "not a readable GGUF")
    assert_one_line_error(run_cli("eval", ours, *args[:2], "--tokens", 10, "--ctx", 64), "tokens >= n_ctx")
