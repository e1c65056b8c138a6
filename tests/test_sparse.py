"""Patches 0004/0005: the predictor-gated sparse FFN in llama.cpp, checked against the dense path
and against a numpy reference of the same semantics."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOKENS, eval_logits as _logits, pi_llama as _llm
from powerinfer_gguf.forward import forward, gguf_weights


def test_all_active_equals_dense(tiny_pi):
    """Every neuron forced active on the sparse path == the dense FFN (same tokens, close logits)."""
    _, ours, _ = tiny_pi
    dense, d_llm = _logits(ours, TOKENS, one_by_one=True, sparse=False)
    full, f_llm = _logits(ours, TOKENS, one_by_one=True, all_active=True)
    assert d_llm.sparse_mode == "dense" and f_llm.sparse_mode == "sparse"
    assert f_llm.sparse_stats()[0].computed_share == 1.0
    err = np.abs(full - dense).max()
    assert err < 1e-4 * max(1.0, np.abs(dense).max()), err
    assert (full.argmax(-1) == dense.argmax(-1)).all()


@pytest.mark.parametrize("threads", [3, 16])
def test_all_active_equals_dense_many_threads(tiny_pi, threads):
    """Rows dealt in blocks of 8 to many threads: a thread can own more rows than a contiguous
    share (704 rows / 16 threads: 6 blocks = 48 > 44). Its list once overran into the next one's."""
    _, ours, _ = tiny_pi
    dense, _ = _logits(ours, TOKENS, one_by_one=True, sparse=False)
    full, _ = _logits(ours, TOKENS, one_by_one=True, all_active=True, n_threads=threads)
    # other thread counts sum in another order (~1e-4); the overrun gave ~0.15
    assert np.abs(full - dense).max() < 5e-4 * max(1.0, np.abs(dense).max())
    assert (full.argmax(-1) == dense.argmax(-1)).all()


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_all_active_equals_dense_half_types(tiny_model, tmp_path, outtype):
    """The kernel's F16 and BF16 row paths (dot products and the fused down accumulation)."""
    from powerinfer_gguf.convert import convert
    _, hf = tiny_model
    path = tmp_path / f"t-{outtype}.pi.gguf"
    convert(hf, path, outtype=outtype, calib_tokens=512, progress=False, log=lambda m: None)
    dense, _ = _logits(path, TOKENS[:8], one_by_one=True, sparse=False)
    full, _ = _logits(path, TOKENS[:8], one_by_one=True, all_active=True)
    sparse, _ = _logits(path, TOKENS[:8], one_by_one=True)
    # dense rounds the FFN input to the weight type for mul_mat as the kernel does; sums differ in order
    assert np.abs(full - dense).max() < 2e-2 * max(1.0, np.abs(dense).max())
    assert (full.argmax(-1) == dense.argmax(-1)).mean() >= 0.85
    assert np.abs(sparse - dense).max() < 0.1 * max(1.0, np.abs(dense).max())


def test_sparse_matches_numpy_reference(tiny_pi):
    """Every way computes exactly the neurons the predictor selects (numpy, same rule): decode (one
    token per eval), a 16-token ubatch as chosen, and each way forced (the sparse op's pairs and
    tiles, and dense GEMMs masked by the selection)."""
    res, ours, _ = tiny_pi
    w = gguf_weights(ours)
    import gguf
    pact = gguf.GGUFReader(ours).fields["powerinfer.predictor.act"].contents()

    def mask(il, xn):
        z = xn @ w[f"blk.{il}.pi_pred_fc1.weight"].T
        if pact == "relu":
            z = np.maximum(z, 0)
        return z @ w[f"blk.{il}.pi_pred_fc2.weight"].T > w[f"blk.{il}.pi_pred_threshold"]

    want = forward(w, res.hparams, np.array(TOKENS), ffn_mask=mask)
    dense_ref = forward(w, res.hparams, np.array(TOKENS))
    assert np.abs(want - dense_ref).max() > 0  # the predictor really drops neurons here
    for kw in ({"one_by_one": True}, {}, {"ffn_way": "pairs"}, {"ffn_way": "tiles"}, {"ffn_way": "dense"}):
        got, llm = _logits(ours, TOKENS, **kw)
        err = np.abs(got - want).max()
        assert err < 2e-3 * max(1.0, np.abs(want).max()), (kw, err)
        st = llm.sparse_stats()
        if kw.get("ffn_way") == "dense":
            assert all(s.tokens == 0 for s in st)  # GEMMs, not the op: nothing counted
            continue
        assert all(s.tokens == len(TOKENS) for s in st)
        assert all(0 < s.computed_share < 0.5 and s.fired <= s.predicted for s in st)
        forced = {"tiles": 1, "pairs": 0}.get(kw.get("ffn_way"))  # evaluations with tiles: one ubatch
        assert forced is None or all(s.cpu_evals_tiles == forced for s in st)


def test_way_follows_the_union(tiny_pi):
    """The CPU kernel takes tiles when the selected pairs fill enough of the union of selected rows
    x tokens (every row selected: a full union), pairs for decode and for a sparse selection."""
    _, ours, _ = tiny_pi
    _, full = _logits(ours, TOKENS, all_active=True)  # one 16-token ubatch, union = all, pairs = all
    assert all(s.cpu_evals_tiles == 1 for s in full.sparse_stats())
    _, dec = _logits(ours, TOKENS, one_by_one=True)  # 1 token: pairs
    assert all(s.cpu_evals_tiles == 0 for s in dec.sparse_stats())
    _, few = _logits(ours, TOKENS[:3], all_active=True)  # under GGML_PI_TILE_MIN_TOKENS
    assert all(s.cpu_evals_tiles == 0 for s in few.sparse_stats())


def test_greedy_text_with_predictor_matches_dense(tiny_pi, capsys):
    """128 greedy tokens: sparse (trained predictor) against dense on the same file."""
    from powerinfer_gguf.bench.profile import sparse_quality
    _, ours, _ = tiny_pi
    q = sparse_quality(str(ours), n_tokens=128, n_threads=2)
    with capsys.disabled():
        print("\n[sparse vs dense, tiny] " + q.line())
    assert q.forced_match >= 0.95
    assert q.logit_rel_err < 0.05
    assert q.computed_share < 0.5


def test_plain_gguf_runs_as_stock(tiny_model):
    res, _ = tiny_model
    llm = _llm(res.path)
    assert llm.sparse_mode == "stock" and llm.sparse_stats() == []
    out = llm("Hello", max_tokens=4)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("kw,msg", [
    ({"vram_budget": "1GiB"}, "no GPU device"),
    ({"vram_budget": "lots"}, "bad size"),
    ({"ffn_way": "fast"}, "ffn_way"),
    ({"n_gpu_layers": 5}, "vram_budget"),
])
def test_bad_options_are_clear(tiny_pi, kw, msg):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match=msg):
        _llm(ours, **kw)


def test_bad_override_type_names_the_key(tiny_pi):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match="powerinfer.runtime.sparse must be a bool"):
        _llm(ours, kv_overrides={"powerinfer.runtime.sparse": 3})


_PROBE = """
import os, sys, numpy as np
from powerinfer_gguf import Llama
llm = Llama(sys.argv[1], n_ctx=64, n_batch=64, n_threads=int(sys.argv[3]), n_threads_batch=int(sys.argv[3]),
            verbose=False, logits_all=True,
            all_active=os.environ.get("PI_PROBE_ALL_ACTIVE") == "1")
toks = [int(t) for t in sys.argv[4].split(",")]
for t in toks[:8]:
    llm.eval([t])          # decode: one token per evaluation
llm.eval(toks[8:])         # and one many-token ubatch
np.save(sys.argv[2], np.array(llm.scores[: len(toks)]))
"""


def _probe_logits(path, npy, threads, **env):
    """Logits of _PROBE in a fresh process (with env added), and that process's stderr."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(npy), str(threads),
                        ",".join(map(str, TOKENS))], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(npy), r.stderr


def test_op_against_its_definition_in_primitives():
    """The op on every backend (here: the CPU, on 1-4 threads) against the same function built from
    ggml primitives (mul_mat, relu, mul, step): F32/F16/BF16/Q8_0/Q4_0 rows, decode and ubatches,
    ReLU and dReLU, 10%/50%/all active, widths through every vector path; the counters too."""
    import re
    import subprocess

    from powerinfer_gguf import build
    r = subprocess.run([str(build.bin_path("patched", "test-pi-sparse-ffn"))], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    m = re.search(r"(\d+) of (\d+) runs passed", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 700, r.stdout[-2000:]


def test_same_bits_every_run(tiny_pi, tmp_path):
    """Threads claim gate/up blocks as they get free, yet the down rows each thread adds follow
    from the counts alone: the logits are the same bits every run, decode and a ubatch alike, and
    with every neuron computed on one thread (more fired pairs than the down phase gathers at once)."""
    for threads, env in ((3, {}), (1, {"PI_PROBE_ALL_ACTIVE": "1"})):
        a, _ = _probe_logits(tiny_pi[1], tmp_path / f"a-{threads}.npy", threads, **env)
        b, _ = _probe_logits(tiny_pi[1], tmp_path / f"b-{threads}.npy", threads, **env)
        assert np.array_equal(a, b), threads


def test_backend_ops_cases_run_on_cpu():
    """The op's test-backend-ops cases build, fill, compute and time on the CPU
    backend (on a GPU machine the same binary compares each GPU backend against the CPU): one
    perf case of 7B-shape rows, 10% active, reports its GB/s; the test cases all pass."""
    import re
    import subprocess

    from powerinfer_gguf import build
    exe = build.bin_path("patched", "test-backend-ops")
    r = subprocess.run([str(exe), "perf", "-o", "PI_SPARSE_FFN", "-b", "CPU", "-p", r"n_embd=4096,.*active=0.100000,drelu=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [l for l in r.stdout.splitlines() if l.strip().startswith("PI_SPARSE_FFN(")]
    assert len(rows) == 1, r.stdout[-2000:]
    gbps = float(re.search(r"([0-9.]+) GB/s", rows[0]).group(1))
    assert gbps > 0.1, rows[0]
    # the test mode's cases (each backend against the CPU; named, the CPU runs them against
    # itself): every case builds, fills and computes
    r = subprocess.run([str(exe), "-o", "PI_SPARSE_FFN", "-b", "CPU"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    m = re.search(r"(\d+)/(\d+) tests passed", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 40, r.stdout[-2000:]
