"""pi-bench stock side: budget parsing, the -ngl plan, and a real run on a tiny model."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from powerinfer_gguf.bench.stock import compute_buffer_estimate, stock_offload
from powerinfer_gguf.model_file import GiB, ModelSizes, parse_size


def test_parse_size():
    assert parse_size("0") == 0
    assert parse_size("8GiB") == 8 * GiB
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size("40%", 1000) == 400
    for bad, msg in (("ten", "bad size"), ("5XB", "bad size"), ("-3GiB", "bad size"), ("150%", "within 0-100"),
                     ("x%", "bad budget")):
        with pytest.raises(ValueError, match=msg):
            parse_size(bad, 1000)
    with pytest.raises(ValueError, match="needs a model"):
        parse_size("40%")


def _sizes(n_layer=4, layer=100, out=50):
    return ModelSizes("m", n_layer, 64, 4, 4, 128, 1000, [layer] * n_layer, out, 70, [60] * n_layer)


def test_stock_offload_fills_the_budget_from_the_last_layer():
    s = _sizes()
    n_ctx = 16
    kv = s.kv_bytes_per_layer(n_ctx)
    assert stock_offload(s, 0, n_ctx).ngl == 0
    plan = stock_offload(s, 10**9, n_ctx)
    assert plan.ngl == s.n_layer + 1  # everything, output layer too
    assert plan.weight_bytes == 4 * 100 + 50 and plan.kv_bytes == 4 * kv
    # llama.cpp's order: the output layer first (-ngl 1), then repeating layers from the last; a
    # layer left on the CPU has its weights copied over for a large ubatch (staging: 100 bytes)
    budget = compute_buffer_estimate(s, n_ctx, n_ctx, True) + 50 + 2 * (100 + kv) + 100
    three = stock_offload(s, budget, n_ctx)
    assert three.ngl == 3 and three.gpu_bytes <= budget and three.weight_bytes == 50 + 2 * 100
    assert stock_offload(s, budget - 1, n_ctx).ngl == 2  # the staging counts


def _side(name, strategy, pp, tg, ttft=None):
    from powerinfer_gguf.bench import SideResult
    return SideResult(name, "llama-bench", "m.gguf", [], strategy, 0, 100, 100, 0, None, [pp, pp], [tg, tg],
                      {n: [v] for n, v in (ttft or {}).items()})


def _pick_case():
    """Issue 15's run: -ngl 16 faster at decode, -ot faster at pp512 (1455 > 1136 t/s) and at
    a 2048-token prompt, -ngl at a 512-token one."""
    from powerinfer_gguf.bench import BenchResult
    sides = {"stock": _side("stock", "-ngl 16/41", 1136.0, 9.0, {512: 1200.0, 2048: 900.0}),
             "stock_ot": _side("stock_ot", "-ot: attention+KV+output on GPU, FFN of 12/40 layers on CPU", 1455.0, 6.0,
                               {512: 1100.0, 2048: 1000.0}),
             "ours": _side("ours", "planned at load", 1600.0, 27.0, {512: 1500.0, 2048: 1250.0})}
    return BenchResult("m.gguf", 10 * GiB, 16, 512, 128, 2, 26 * GiB, sides)


def test_stock_pick_follows_the_measure():
    """Each measure compares ours with stock's way faster at that measure, and names it."""
    from powerinfer_gguf.bench import faster_stock, render_table
    res = _pick_case()
    assert faster_stock(res.sides, "tg").name == "stock" and faster_stock(res.sides, "pp").name == "stock_ot"
    assert faster_stock(res.sides, 512).name == "stock" and faster_stock(res.sides, 2048).name == "stock_ot"
    assert faster_stock({"ours": res.sides["ours"]}, "tg") is None
    d = res.to_json()
    assert d["stock_way"] == {"pp": "stock_ot", "tg": "stock", "512": "stock", "2048": "stock_ot"}
    assert d["ratio_tg"] == pytest.approx(27 / 9) and d["ratio_pp"] == pytest.approx(1600 / 1455)
    assert d["ratio_ttft"] == {"512": pytest.approx(1500 / 1200), "2048": pytest.approx(1250 / 1000)}
    assert d["ours"]["ttft"]["2048"]["seconds"] == pytest.approx(2048 / 1250)
    text = render_table(res)
    assert ("stock's faster way at prompts (pp512): -ot: attention+KV+output on GPU, FFN of 12/40 layers on CPU; "
            "at decode (tg128): -ngl 16/41") in text
    assert "decode ratio ours/stock: 3.00x" in text and "prompt ratio ours/stock: 1.10x" in text
    assert "  2048 tokens: ours 1.638 s, stock 2.048 s (-ot: attention" in text and "ratio 1.25x" in text
    assert "  512 tokens: ours 0.341 s, stock 0.427 s (-ngl 16/41); ratio 1.25x" in text


def test_results_written_before_the_pick_per_measure_still_load(tmp_path):
    """JSON of older runs ("stock" = the way faster at decode, "stock_alt" the other, no TTFT)
    loads, and the pick is made again per measure."""
    from powerinfer_gguf.bench import load_results, render_sweep_table
    d = _pick_case().to_json()
    for k in ("stock_way", "ratio_ttft"):
        del d[k]
    for side in ("stock", "stock_ot", "ours"):
        del d[side]["ttft"]
    d["stock_alt"] = d.pop("stock_ot")
    (tmp_path / "old.json").write_text(json.dumps([d]))
    back = load_results(tmp_path / "old.json")[0]
    assert back.stock_for("pp").name == "stock_alt" and back.stock_for("tg").name == "stock"
    assert back.ratio("pp") == pytest.approx(d["ratio_pp"]) and back.ttft_sizes == []
    assert "| -ot: attention+KV+output on GPU, FFN of 12/40 layers on CPU | 1455.00 | 1600.00 | 1.10x |" in \
        render_sweep_table([back])


def test_ttft_sizes_parse_and_default():
    """--ttft: sizes in tokens or none; not given: 512 and 2048 under a budget above 0, none at 0."""
    from powerinfer_gguf.bench.runner import parse_ttft, ttft_sizes
    assert parse_ttft("2048, 512,512") == [512, 2048] and parse_ttft("None") == [] and parse_ttft(None) is None
    for bad in ("", "0", "-512", "512,", "2k", "512;2048"):
        with pytest.raises(ValueError, match="give prompt sizes in tokens above 0"):
            parse_ttft(bad)
    assert ttft_sizes(None, 0) == [] and ttft_sizes(None, GiB) == [512, 2048]
    assert ttft_sizes([64], 0) == [64] and ttft_sizes([], GiB) == []


def test_model_sizes_from_file(tiny_model):
    res, _ = tiny_model
    s = ModelSizes.from_gguf(res.path)
    assert s.n_layer == 4 and s.n_ff == 704 and s.n_head_kv == 2
    assert s.weight_bytes <= res.bytes
    assert all(f < l for f, l in zip(s.ffn_bytes, s.layer_bytes))


def _cli(*args):
    return run_cli("bench", *args)


def test_pi_bench_runs_stock_at_budget_zero(tiny_model, tmp_path):
    res, _ = tiny_model
    j, png = tmp_path / "r.json", tmp_path / "r.png"
    r = _cli(str(res.path), "--vram-budget", "0", "-p", "16", "-n", "8", "-r", "2", "-t", "2",
             "--json", str(j), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "| stock | -ngl 0/5" in r.stdout
    assert "TTFT" not in r.stdout and "time to first token" not in r.stdout  # not by default at budget 0
    d = json.loads(j.read_text())
    assert d["budget_bytes"] == 0 and d["stock"]["tg_tps"] > 0 and d["stock"]["pp_tps"] > 0
    assert "ttft" not in d["stock"] and d["stock_way"] == {"pp": "stock", "tg": "stock"}
    assert len(d["stock"]["tg_samples"]) == 2
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [
    (["/nonexistent.gguf"], "no such model file"),
    (["{model}", "--vram-budget", "lots"], "bad size"),
    (["{junk}"], "not a readable GGUF"),
])
def test_pi_bench_bad_input_is_one_line(tiny_model, tmp_path, args, msg):
    res, _ = tiny_model
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    assert_one_line_error(_cli(*[a.format(model=res.path, junk=junk) for a in args]), msg)


def test_pi_bench_ours_against_stock(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    j, png = tmp_path / "r.json", tmp_path / "r.png"
    r = _cli(str(ours), "--stock", str(twin), "--vram-budget", "0", "-p", "16", "-n", "8", "-r", "2", "-t", "2",
             "--ttft", "64,16", "--json", str(j), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "| stock | -ngl 0/5" in r.stdout and "| ours | sparse FFN, CPU" in r.stdout
    assert "bytes-per-token bound" in r.stdout
    assert "| pp16 t/s | tg8 t/s | TTFT 16 s | TTFT 64 s |" in r.stdout
    assert "time to first token (prompt tokens / prompt t/s" in r.stdout
    assert "  64 tokens: ours " in r.stdout and "stock " in r.stdout.split("  64 tokens:")[1]
    d = json.loads(j.read_text())
    for side in ("stock", "ours"):
        assert d[side]["pp_tps"] > 0 and d[side]["tg_tps"] > 0 and len(d[side]["tg_samples"]) == 2
        t = d[side]["ttft"]
        assert sorted(t) == ["16", "64"] and len(t["64"]["pp_samples"]) == 2
        assert t["64"]["seconds"] == pytest.approx(64 / t["64"]["pp_tps"])
        assert t["16"]["pp_samples"] == d[side]["pp_samples"]  # -p 16 is a TTFT size too: run once
    assert d["ratio_ttft"]["64"] == pytest.approx(d["stock"]["ttft"]["64"]["seconds"] / d["ours"]["ttft"]["64"]["seconds"])
    assert d["ratio_tg"] == pytest.approx(d["ours"]["tg_tps"] / d["stock"]["tg_tps"])
    assert d["budget_bytes"] == 0
    # ours reads fewer bytes per token than stock: the bound is above 1
    assert d["ours"]["decode_bytes"] < d["stock"]["decode_bytes"] and d["bound_tg"] > 1
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [
    (["{plain}", "--stock", "{twin}"], "has no sparse layout"),
    (["{ours}", "--stock", "{plain_other}"], "not its stock twin"),
    (["{ours}", "--stock", "{twin}", "--vram-budget", "1GiB"], "no GPU device"),
])
def test_pi_bench_ours_bad_input_is_one_line(tiny_pi, tmp_path, args, msg):
    res, ours, twin = tiny_pi
    from dataclasses import replace
    from powerinfer_gguf.synth import hparams_for, synthesize
    other = tmp_path / "other.gguf"
    if "{plain_other}" in args:
        synthesize(other, "tiny", outtype="f32", hparams=replace(hparams_for("tiny", "relu"), n_layer=2),
                   progress=False)
    assert_one_line_error(_cli(*[a.format(plain=res.path, twin=twin, ours=ours, plain_other=other) for a in args]), msg)


def test_pi_bench_sweep_table_plot_and_json_round_trip(tiny_pi, tmp_path):
    """--sweep: one run per budget, the sweep table, the plot, and a JSON that load_results reads
    back into the same table (how results made on the GPU machine are rendered here)."""
    from powerinfer_gguf import bench
    _, ours, twin = tiny_pi
    j, png = tmp_path / "s.json", tmp_path / "s.png"
    r = _cli(str(ours), "--stock", str(twin), "--sweep", "0,0", "-p", "8", "-n", "8", "-r", "1", "-t", "2",
             "--ttft", "32", "--json", str(j), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert ("| budget | share of weights | stock at decode | stock tg t/s | ours placement | ours tg t/s | tg ratio "
            "| bound | stock at prompts | stock pp t/s | ours pp t/s | pp ratio | TTFT 32 s stock / ours |") in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 0.00 GiB | 0% | -ngl 0/5 |")]
    assert len(rows) == 2
    d = json.loads(j.read_text())
    cells = rows[0].strip("| ").split(" | ")
    assert cells[8] == "-ngl 0/5" and float(cells[9]) == pytest.approx(d[0]["stock"]["pp_tps"], abs=0.01)
    assert float(cells[10]) == pytest.approx(d[0]["ours"]["pp_tps"], abs=0.01)
    assert cells[11] == f"{d[0]['ratio_pp']:.2f}x"
    assert cells[12] == f"{d[0]['stock']['ttft']['32']['seconds']:.3f} / {d[0]['ours']['ttft']['32']['seconds']:.3f}"
    back = bench.load_results(j)
    assert len(back) == 2 and back[0].sides["ours"].tg_samples == d[0]["ours"]["tg_samples"]
    assert back[1].sides["ours"].ttft_samples == {32: d[1]["ours"]["ttft"]["32"]["pp_samples"]}
    assert bench.render_sweep_table(back).splitlines()[-2:] == r.stdout.strip().splitlines()[-2:]
    assert png.stat().st_size > 1000
    assert_one_line_error(_cli(str(ours), "--stock", str(twin), "--sweep", ","), "at least one budget")


@pytest.mark.parametrize("case,msg", [
    ("json-in-missing-folder", "does not exist"),
    ("json-is-a-folder", "is a folder"),
    ("json-is-the-model", "is an input"),
    ("plot-is-the-twin", "is an input"),
    ("json-and-plot-one-file", "named as two outputs"),
    ("json-exists", "pass --force"),
    ("sweep-with-a-bad-budget", "bad size 'abc'"),
    ("auto-without-gpu", "no GPU device"),
    ("twin-not-gguf", "not a GGUF file"),
    ("profile-not-gguf", "not a GGUF file"),
    ("model-is-a-folder", "not a file"),
    ("ttft-not-a-number", "--ttft '512,2k': give prompt sizes in tokens above 0"),
    ("ttft-zero", "--ttft '0': give prompt sizes"),
])
def test_pi_bench_refuses_bad_arguments_before_running(tiny_pi, tmp_path, case, msg):
    """Every argument and output path is checked before the first llama-bench run: one line, no
    progress line before it, and no input touched (a whole run's result was lost at its end, or
    written over the model, or budget 0 ran before `abc` was refused)."""
    from powerinfer_gguf.runtime import auto_vram_budget
    _, ours, twin = tiny_pi
    if case == "auto-without-gpu" and auto_vram_budget() is not None:
        pytest.skip("a GPU is here: auto is a budget")
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    before = {p: p.stat().st_mtime_ns for p in (ours, twin)}
    run = ["-p", "0", "-n", "4", "-r", "1", "-t", "2"]
    args = {
        "json-in-missing-folder": [ours, "--stock", twin, *run, "--json", tmp_path / "nope" / "r.json"],
        "json-is-a-folder": [ours, "--stock", twin, *run, "--json", tmp_path],
        "json-is-the-model": [ours, "--stock", twin, *run, "--json", ours],
        "plot-is-the-twin": [ours, "--stock", twin, *run, "--plot", twin],
        "json-and-plot-one-file": [ours, "--stock", twin, *run, "--json", tmp_path / "r", "--plot", tmp_path / "r"],
        "json-exists": [ours, "--stock", twin, *run, "--json", text],
        "sweep-with-a-bad-budget": [ours, "--stock", twin, *run, "--sweep", "0,abc"],
        "auto-without-gpu": [ours, "--stock", twin, *run, "--vram-budget", "auto"],
        "twin-not-gguf": [ours, "--stock", text, *run],
        "profile-not-gguf": [text, "--profile", "-n", "2"],
        "model-is-a-folder": [tmp_path, *run],
        "ttft-not-a-number": [ours, "--stock", twin, *run, "--ttft", "512,2k", "--json", tmp_path / "r.json"],
        "ttft-zero": [ours, "--stock", twin, *run, "--sweep", "0,10%", "--ttft", "0"],
    }[case]
    assert_one_line_error(_cli(*args), msg)
    assert {p: p.stat().st_mtime_ns for p in (ours, twin)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_auto_budget_is_the_planners():
    """pi-bench's "auto" is what llama.cpp's planner computes (one definition, in C): none here."""
    from powerinfer_gguf.model_file import parse_size
    from powerinfer_gguf.runtime import auto_vram_budget
    if auto_vram_budget() is None:
        with pytest.raises(ValueError, match="no GPU device"):
            parse_size("auto")
    else:
        assert parse_size("auto") == auto_vram_budget()


def test_host_read_speed_is_the_planners():
    """The bound's host read speed is the one the C planner prices a hand-off at."""
    import re

    from powerinfer_gguf import build
    from powerinfer_gguf.model_file import CPU_READ_GBPS
    text = (build.CSRC_DIR / "src" / "llama-powerinfer-plan.cpp").read_text()
    per_us = float(re.search(r"PI_CPU_BYTES_PER_US\s*=\s*([0-9.e]+)", text).group(1))
    assert per_us == CPU_READ_GBPS * 1e3


def test_pi_bench_serve_streams_ours_against_stock_llama_server(tiny_pi, tmp_path):
    """--serve: ours (the patched llama-server, as pi-serve --parallel runs it) and stock
    llama-server on the twin, each with 2 slots, at 1 and 2 streams: every stream ran to its end,
    the table has both sides and the ratio per stream count, the JSON the rounds."""
    _, ours, twin = tiny_pi
    j = tmp_path / "serve.json"
    r = _cli(str(ours), "--stock", str(twin), "--serve", "1,2", "-p", "8", "-n", "6", "-r", "1", "-t", "2",
             "--json", str(j))
    assert r.returncode == 0, r.stderr[-2000:]
    for k in (1, 2):
        assert f"| {k} | ours (sparse FFN, CPU only) |" in r.stdout and f"| {k} | stock (-ngl 0/5) |" in r.stdout
    d = json.loads(j.read_text())
    assert d["streams"] == [1, 2] and set(d["sides"]) == {"ours", "stock"}
    for side in d["sides"].values():
        for k, rounds in side["rounds"].items():
            assert len(rounds) == 1 and rounds[0]["tokens"] == 6 * int(k) and rounds[0]["tokens_per_s"] > 0
    ratio = [line for line in r.stdout.splitlines() if line.startswith("| 2 | ours")][0].split("|")[-2]
    assert ratio.strip().endswith("x")


@pytest.mark.parametrize("args,msg", [
    (["--serve", "0,4"], "stream counts of at least 1"),
    (["--serve", "a,b"], "give stream counts"),
    (["--serve", "2", "-n", "1"], "at least 2 generated"),
    (["--serve", "2", "--vram-budget", "1GiB"], "no GPU"),
])
def test_pi_bench_serve_bad_input_is_one_line(tiny_pi, args, msg):
    _, ours, twin = tiny_pi
    assert_one_line_error(_cli(str(ours), "--stock", str(twin), *args), msg)
