"""Placement: FFN rows split into a hot part (the layer's device) and a cold part (CPU memory), the VRAM-budget planner's
checks, pi-synth --pi, and pi-bench's GPU-side plans. A CPU-only build puts both parts of a split
in CPU memory, which is what CI checks here: the split, the views of score and threshold, the
merge; tools/gpu-split.sh runs the same checks with the hot part on a GPU."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import TOKENS as _ALL_TOKENS, eval_logits, pi_llama
from powerinfer_gguf.format import Keys

TOKENS = _ALL_TOKENS[:12]


def _logits(path, one_by_one=True, **kw):
    return eval_logits(path, TOKENS, one_by_one, n_ctx=64, **kw)


@pytest.mark.parametrize("mode", [{}, {"all_active": True}, {"sparse": False}])
@pytest.mark.parametrize("dev_rows", [64, 320])
def test_split_equals_whole(tiny_pi, mode, dev_rows):
    """Rows [0, h) and [h, n_ff) as two tensors over the file's bytes give the whole FFN's result
    (sparse, every neuron active, and dense), decode and a 12-token ubatch."""
    _, ours, _ = tiny_pi
    for one in (True, False):
        whole, _ = _logits(ours, one, **mode)
        split, llm = _logits(ours, one, kv_overrides={Keys.Runtime.DEV_ROWS: dev_rows}, **mode)
        err = np.abs(split - whole).max() / np.abs(whole).max()
        assert err < 5e-4, (mode, dev_rows, one, err)  # summation order only
        assert (split.argmax(-1) == whole.argmax(-1)).all()
    pl = llm.placement()
    assert len(pl) == 4 and all(p.split and p.gpu_rows == 0 and not p.attn_gpu for p in pl)
    assert pl[0].neurons == 704


def test_split_counts_every_row(tiny_pi):
    """Both parts report to the layer's counters: a split layer offers n_ff rows per token."""
    _, ours, _ = tiny_pi
    _, llm = _logits(ours, kv_overrides={Keys.Runtime.DEV_ROWS: 128})
    st = llm.sparse_stats()[0]
    assert st.tokens == len(TOKENS) and 0 < st.predicted < st.tokens * st.neurons


@pytest.mark.parametrize("budget,msg", [
    ("1GiB", "no GPU device"),
    ("auto", "no GPU device"),
    ("40%", "no GPU device"),
    (-5, "cannot be negative"),
])
def test_budget_without_gpu_is_one_clear_error(tiny_pi, budget, msg):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match=msg) as e:
        pi_llama(ours, vram_budget=budget, n_ctx=64)
    assert "\n" not in str(e.value)


def test_budget_zero_is_cpu_only(tiny_pi):
    _, ours, _ = tiny_pi
    llm = pi_llama(ours, vram_budget=0, n_ctx=64)
    assert all(not p.split and p.gpu_rows == 0 for p in llm.placement())


def test_synth_pi_layout_matches_its_twin(tmp_path):
    """pi-synth --pi: our layout of the same weights (rows ranked, down_t, predictors from the
    generator's gate signal) computes what its twin computes; recall as planned."""
    import gguf
    from powerinfer_gguf.synth import synthesize
    twin, ours = tmp_path / "t.stock.gguf", tmp_path / "t.pi.gguf"
    synthesize(twin, "tiny", outtype="f32", pi_out=ours, progress=False)
    r = gguf.GGUFReader(ours)
    recall = r.fields[Keys.PREDICTOR_RECALL].contents()
    precision = r.fields[Keys.PREDICTOR_PRECISION].contents()
    assert len(recall) == 4 and min(recall) > 0.98 and 0.3 < min(precision) <= 1.0
    freq = {t.name: np.asarray(t.data) for t in r.tensors if "pi_neuron_freq" in t.name}
    assert len(freq) == 4 and all((np.diff(f) <= 0).all() and 0.05 < f.mean() < 0.15 for f in freq.values())
    a, _ = _logits(twin)
    b, _ = _logits(ours, sparse=False)
    c, llm = _logits(ours)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    assert (a.argmax(-1) == c.argmax(-1)).mean() >= 0.9
    assert llm.sparse_stats()[0].computed_share < 0.3


def test_llama_bench_takes_kv_overrides(tiny_pi):
    from powerinfer_gguf.build import bin_path
    _, ours, _ = tiny_pi
    exe = str(bin_path("patched", "llama-bench"))
    ok = subprocess.run([exe, "-m", str(ours), "-p", "0", "-n", "4", "-r", "1", "-t", "2", "-o", "json",
                         "--override-kv", f"{Keys.Runtime.DEV_ROWS}=int:64"], capture_output=True, text=True)
    assert ok.returncode == 0 and '"n_gen": 4' in ok.stdout
    bad = subprocess.run([exe, "-m", str(ours), "-p", "0", "-n", "4", "-r", "1", "-t", "2", "-v",
                          "--override-kv", f"{Keys.Runtime.VRAM_BUDGET}=int:1000000"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no GPU device" in bad.stderr


def test_load_mode_auto_keeps_mmap_without_pinned_gpu_memory(tiny_pi):
    # our file is loaded unmapped in load mode auto only where a discrete GPU has pinned host memory
    # (llama_pi_auto_load_mode); here, with none, it is mapped as llama.cpp maps any file
    from powerinfer_gguf.build import bin_path, detect_config
    if detect_config().cuda:
        pytest.skip("a CUDA build: there the file is loaded unmapped")
    _, ours, _ = tiny_pi
    r = subprocess.run([str(bin_path("patched", "llama-bench")), "-m", str(ours), "-p", "0", "-n", "1", "-r", "1",
                        "-t", "2", "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(load_mode = mmap)" in r.stderr and "powerinfer: load mode auto" not in r.stderr


def test_stock_override_plan():
    from powerinfer_gguf.bench.stock import stock_override
    from powerinfer_gguf.model_file import ModelSizes
    n_layer, layer, ffn, out = 4, 1000, 600, 300
    s = ModelSizes("m", n_layer, 64, 4, 4, 128, 1000, [layer] * n_layer, out, 70, [ffn] * n_layer)
    assert stock_override(s, 0, 8) is None
    big = stock_override(s, 10 ** 9, 8)
    assert big.ffn_cpu == 0 and big.args() == ["-ngl", "5"]
    # FFN weights left on the CPU are copied to the GPU for a large ubatch, a layer's at a time:
    # the plan counts that staging (one FFN) once any layer's FFN is on the CPU
    need_all_cpu = stock_override(s, big.gpu_bytes - 3 * ffn, 8)
    assert need_all_cpu.ffn_cpu == 4
    some = stock_override(s, big.gpu_bytes - 1, 8)
    assert some.ffn_cpu == 2 and "blk\\.(0|1)\\.ffn_" in some.args()[-1]


def test_pi_bench_reads_the_plan_through_the_c_api(tiny_pi):
    """pi-bench's placement of ours is llama.cpp's plan, asked through the C API (no log parsed):
    without a GPU a budget is refused in one line before any run; planned without a GPU (tests),
    the hot rows and their bytes follow the plan."""
    from powerinfer_gguf.bench.runner import planned_placement
    from powerinfer_gguf.model_file import ModelSizes
    from powerinfer_gguf.runtime import plan_file
    _, ours, _ = tiny_pi
    sizes = ModelSizes.from_gguf(ours)
    with pytest.raises(ValueError, match="no GPU device"):
        planned_placement(sizes, 10 ** 9, 64)
    no_gpu = {Keys.Runtime.PLAN_WITHOUT_GPU: True, Keys.Runtime.VRAM_RESERVE: 0}
    plan = plan_file(ours, ours.stat().st_size // 2, 64, no_gpu)
    assert any(p.split for p in plan) and all(p.gpu_rows == 0 for p in plan)  # no GPU: both parts on the CPU


def test_q4_0_rows_sparse_split_and_dense(tiny_pi, tmp_path):
    """A Q4_0 sparse file (rows quantized, predictors kept F16): gate/up stay out of repacked CPU
    buffers (the op reads rows), the dense path dequantizes down_t before transposing it, and the
    split reads the right quantized bytes."""
    from powerinfer_gguf.build import bin_path
    _, ours, _ = tiny_pi
    q = tmp_path / "tiny.q4.pi.gguf"
    r = subprocess.run([str(bin_path("patched", "llama-quantize")), "--tensor-type", "pi_pred_fc1=f16",
                        "--tensor-type", "pi_pred_fc2=f16", str(ours), str(q), "q4_0", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    dense, _ = _logits(q, sparse=False)
    full, _ = _logits(q, all_active=True)
    split, _ = _logits(q, all_active=True, kv_overrides={Keys.Runtime.DEV_ROWS: 256})
    for x in (full, split):
        assert np.abs(x - dense).max() / np.abs(dense).max() < 1e-3
        assert (x.argmax(-1) == dense.argmax(-1)).all()


def _plan(path, budget, **kv):
    """The planner's decision without a GPU (powerinfer.runtime.plan_without_gpu: every part stays
    in CPU memory, but the plan is the one a GPU of that budget would get)."""
    over = {Keys.Runtime.PLAN_WITHOUT_GPU: True, Keys.Runtime.VRAM_RESERVE: 0}
    over.update(kv)
    llm = pi_llama(path, vram_budget=int(budget), n_ctx=64, logits_all=True, kv_overrides=over)
    return llm, llm.placement()


def test_planner_fills_the_budget_hot_rows_first(tiny_pi):
    from powerinfer_gguf.model_file import ModelSizes
    _, ours, _ = tiny_pi
    s = ModelSizes.from_gguf(ours)
    kv = 64 * 2 * 2 * (s.n_head_kv * (s.n_embd // s.n_head))
    base = s.output_bytes + sum(l - f for l, f in zip(s.layer_bytes, s.ffn_bytes)) + s.n_layer * kv
    # everything fits: every layer whole where it runs
    _, pl = _plan(ours, base + sum(s.ffn_bytes) + 1)
    assert [p.dev_rows for p in pl] == [704] * 4 and not any(p.split for p in pl)
    # 60% of the rows, no hand-off cost: one cut-off, every layer split at about 60%, hottest first
    llm, pl = _plan(ours, base + 0.6 * sum(s.ffn_bytes), **{Keys.Runtime.SPLIT_COST_US: 0})
    rows = [p.dev_rows for p in pl]
    assert all(0 < r < 704 and r % 32 == 0 for r in rows) and all(p.split for p in pl)
    assert 0.45 * 4 * 704 < sum(rows) <= 0.6 * 4 * 704
    # the plan is a correct model: same logits as the whole-layer file
    whole, _ = _logits(ours)
    for t in TOKENS:
        llm.eval([t])
    planned = np.array(llm.scores[: len(TOKENS)])
    assert np.abs(planned - whole).max() / np.abs(whole).max() < 5e-4
    # a hand-off cost larger than a layer's cold bytes: whole layers instead of four splits
    _, pl = _plan(ours, base + 0.6 * sum(s.ffn_bytes), **{Keys.Runtime.SPLIT_COST_US: 1000})
    assert [p.dev_rows for p in pl].count(704) == 2


def test_planner_refuses_what_cannot_fit(tiny_pi):
    _, ours, _ = tiny_pi
    with pytest.raises(ValueError, match="cannot hold the output layer") as e:
        _plan(ours, 1000)
    assert "give at least" in str(e.value)
    with pytest.raises(ValueError, match="vram_ctx"):
        _plan(ours, 10 ** 9, **{Keys.Runtime.VRAM_CTX: 0})
