"""The placement planner as the pure function it is (llama_pi_plan, src/llama-powerinfer-plan.cpp):
costs and a budget in, GPU layers and rows per layer out. No model, no GPU."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from powerinfer_gguf.runtime import PlanLayer, plan_placement

MiB = 1 << 20


def power_law(n: int, mean: float, seed: int) -> np.ndarray:
    """Frequencies hot to cold with a long tail, as a ranked file carries them."""
    rng = np.random.default_rng(seed)
    f = np.sort(rng.pareto(1.2, n))[::-1]
    return np.clip(f / f.mean() * mean, 0, 1).astype(np.float32)


def layers_of(n_layer=6, n_rows=1024, base=8 * MiB, row=6 * 1024, seed=0) -> list[PlanLayer]:
    return [PlanLayer(base, row, power_law(n_rows, 0.1, seed + i)) for i in range(n_layer)]


def cpu_cost(layers, dev_rows, n_gpu_layers, split_us=0.0) -> float:
    """Expected bytes the CPU reads per token: whole CPU layers, and each GPU layer's cold rows."""
    n_layer = len(layers)
    first_gpu = n_layer - max(0, n_gpu_layers - 1)
    c = 0.0
    for il, l in enumerate(layers):
        if il < first_gpu:
            c += l.base_bytes + float(np.sum(l.freq)) * l.row_bytes
        else:
            h = dev_rows[il]
            c += float(np.sum(np.minimum.accumulate(l.freq)[h:])) * l.row_bytes
            c += split_us * 90e3 if 0 < h < len(l.freq) else 0.0
    return c


def gpu_bytes(layers, dev_rows, n_gpu_layers, output_bytes) -> int:
    k = max(0, n_gpu_layers - 1)
    fixed = (output_bytes if n_gpu_layers >= 1 else 0) + sum(l.base_bytes for l in layers[len(layers) - k:])
    return fixed + sum(dev_rows[il] * l.row_bytes for il, l in enumerate(layers) if il >= len(layers) - k)


def test_everything_fits_whole():
    layers = layers_of()
    ngl, rows = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=1 << 40)
    assert ngl == len(layers) + 1
    assert rows == [1024] * len(layers)


def test_output_that_does_not_fit_says_so():
    ngl, rows = plan_placement(layers_of(), output_bytes=4 * MiB, avail_bytes=3 * MiB)
    assert ngl == -1
    assert rows == [1024] * 6  # nothing planned: every layer whole where it runs (the CPU)


def test_plan_within_budget_and_hot_rows_first():
    layers = layers_of()
    for avail in (5 * MiB, 20 * MiB, 40 * MiB, 60 * MiB, 80 * MiB):
        ngl, rows = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=avail, split_cost_us=0)
        assert gpu_bytes(layers, rows, ngl, 4 * MiB) <= avail
        k = ngl - 1
        for il in range(len(layers) - k):
            assert rows[il] == 1024  # CPU layers: whole where they run
        for il in range(len(layers) - k, len(layers)):
            assert rows[il] == 1024 or rows[il] % 32 == 0  # split points aligned for the GPU


def test_more_budget_never_reads_more_on_the_cpu():
    layers = layers_of()
    costs = []
    for avail in range(6, 100, 6):
        ngl, rows = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=avail * MiB, split_cost_us=0)
        costs.append(cpu_cost(layers, rows, ngl))
    assert all(b <= a + 1e-6 for a, b in zip(costs, costs[1:])), costs


def test_rows_as_good_as_any_aligned_split():
    """Two GPU layers, every aligned (h0, h1) that fits: the planner's CPU reads are the least,
    within one aligned block of rows (its cut-off is rounded down to 32 rows)."""
    layers = layers_of(n_layer=2, n_rows=256, base=1 * MiB, row=4096, seed=3)
    out = 1 * MiB
    avail = out + 2 * MiB + 300 * 4096  # both layers whole-attention, 300 rows of 512
    ngl, rows = plan_placement(layers, output_bytes=out, avail_bytes=avail, split_cost_us=0)
    assert ngl == 3
    mine = cpu_cost(layers, rows, ngl)
    best = min(cpu_cost(layers, [h0, h1], 3)
               for h0, h1 in itertools.product(range(0, 257, 32), repeat=2)
               if gpu_bytes(layers, [h0, h1], 3, out) <= avail)
    block = max(float(np.max(l.freq[:32].sum())) * l.row_bytes for l in layers)
    assert mine <= best + block


def test_split_cost_prefers_whole_layers():
    layers = layers_of(n_layer=8, n_rows=512, base=1 * MiB, row=4096)
    avail = 4 * MiB + 8 * MiB + 4 * 512 * 4096 + 100 * 4096
    split = lambda rows: sum(0 < h < 512 for h in rows)
    _, free = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=avail, split_cost_us=0)
    _, costly = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=avail, split_cost_us=100000)
    assert split(costly) < split(free)


def test_caller_cap_and_rows_the_gpu_cannot_read():
    layers = layers_of()
    layers[5] = PlanLayer(layers[5].base_bytes, layers[5].row_bytes, layers[5].freq, gpu_rows=False)
    ngl, rows = plan_placement(layers, output_bytes=4 * MiB, avail_bytes=1 << 40, n_gpu_layers_cap=3)
    assert ngl == 3
    assert rows[:4] == [1024] * 4
    assert rows[4] == 1024 and rows[5] == 0  # a row type the GPU cannot read stays in CPU memory


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="row_bytes"):
        plan_placement([PlanLayer(1, 1, np.zeros(0, np.float32)), PlanLayer(1, -1, np.ones(4, np.float32))],
                       output_bytes=1, avail_bytes=10)


def test_plan_of_a_file_without_loading_it_is_the_load_plan(tiny_pi):
    """plan_file (llama.cpp with no_alloc: metadata only) gives the placement a real load makes."""
    from powerinfer_gguf import Llama
    from powerinfer_gguf.format import Keys
    from powerinfer_gguf.runtime import plan_file

    _, ours, _ = tiny_pi
    no_gpu = {Keys.Runtime.PLAN_WITHOUT_GPU: True, Keys.Runtime.VRAM_RESERVE: 0}
    budget = ours.stat().st_size // 2
    planned = plan_file(ours, budget, 64, no_gpu)
    llm = Llama(str(ours), vram_budget=budget, n_ctx=64, verbose=False, kv_overrides=no_gpu)
    loaded = llm.placement()
    llm.close()
    assert planned == loaded
    assert any(p.split for p in planned)  # the budget splits some layer: the case worth checking
