"""Patch 0010 and pi-bench --profile: the CPU sparse FFN kernel counts the bytes of rows it reads,
its time and its threads; the profile splits a decoded token's time into that kernel and the rest."""
from __future__ import annotations

import json

import pytest

from conftest import TOKENS as _ALL_TOKENS, assert_one_line_error, pi_llama, run_cli
from powerinfer_gguf.format import Keys

TOKENS = _ALL_TOKENS[:12]


def _stats(path, n_threads=2, **kw):
    llm = pi_llama(path, n_ctx=64, n_threads=n_threads, **kw)
    for t in TOKENS:
        llm.eval([t])
    st = llm.sparse_stats()
    n_embd = int(llm.metadata["llama.embedding_length"])
    llm.close()
    return st, n_embd


@pytest.mark.parametrize("n_threads", [1, 3])
def test_cpu_kernel_counts_bytes_time_and_threads(tiny_pi, n_threads):
    """Rows read = a gate row per predicted neuron, an up row per gate that fires, a down row per
    non-zero activation: between the two bounds that follow from the predicted and fired counts."""
    _, ours, _ = tiny_pi
    stats, n_embd = _stats(ours, n_threads)
    row = 4 * n_embd  # F32 rows
    for s in stats:
        assert s.tokens == len(TOKENS) and 0 < s.fired < s.predicted
        assert s.predicted * row + 2 * s.fired * row <= s.cpu_bytes <= 2 * s.predicted * row + s.fired * row, s
        assert s.cpu_ns > 0 and s.cpu_threads == n_threads
        assert s.cpu_gbps > 0 and s.cpu_ms_per_token > 0


def test_split_parts_count_the_same_bytes_as_the_whole(tiny_pi):
    """Rows read do not depend on where a layer is cut: both CPU parts of a split count, and their
    sum is the whole layer's count: exactly in layer 0 (same input), within a few rows further on
    (the split sums its parts in another order: a score or gate at its threshold may flip)."""
    _, ours, _ = tiny_pi
    whole, n_embd = _stats(ours)
    split, _ = _stats(ours, kv_overrides={Keys.Runtime.DEV_ROWS: 128})
    assert (whole[0].predicted, whole[0].fired, whole[0].cpu_bytes) == \
        (split[0].predicted, split[0].fired, split[0].cpu_bytes)
    for w, s in zip(whole[1:], split[1:]):
        assert abs(w.predicted - s.predicted) <= 4 and abs(w.cpu_bytes - s.cpu_bytes) <= 12 * 4 * n_embd


def test_all_active_reads_every_gate_row(tiny_pi):
    _, ours, _ = tiny_pi
    stats, n_embd = _stats(ours, all_active=True)
    for s in stats:
        assert s.predicted == s.tokens * s.neurons
        assert s.cpu_bytes >= s.predicted * 4 * n_embd


def test_dense_path_counts_no_cpu_kernel_time(tiny_pi):
    _, ours, _ = tiny_pi
    stats, _ = _stats(ours, sparse=False)
    assert all(s.cpu_ns == 0 and s.cpu_bytes == 0 and s.cpu_threads == 0 for s in stats)


def test_pi_bench_profile_splits_the_token_time(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    out = tmp_path / "profile.json"
    r = run_cli("bench", ours, "--profile", "-t", "2", "-p", "8", "-n", "16", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CPU sparse FFN" in r.stdout and "the rest" in r.stdout
    d = json.loads(out.read_text())
    assert d["n_tokens"] == 16 and d["cpu_threads"] == 2 and len(d["layers"]) == 4
    assert 0 < d["cpu_ffn_ms"] < d["token_ms"] and d["rest_ms"] > 0
    assert d["cpu_ffn_bytes"] == pytest.approx(sum(s["cpu_bytes"] for s in d["layers"]) / 16)
    assert d["cpu_gbps"] > 0


def test_pi_bench_profile_refuses_side_by_side_options(tiny_pi):
    _, ours, twin = tiny_pi
    r = run_cli("bench", ours, "--profile", "--stock", twin, timeout=120)
    assert r.returncode == 2 and "--profile runs ours alone" in r.stderr


def test_pi_bench_profile_of_a_plain_gguf_is_one_line(tiny_pi):
    _, _, twin = tiny_pi
    assert_one_line_error(run_cli("bench", twin, "--profile", "-n", "2", timeout=300), "has no sparse layout")
