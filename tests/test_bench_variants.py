"""tools/bench_variants.py: pi-bench's sides run again with variants of llama-bench's settings."""
from __future__ import annotations

import json
import sys

from conftest import ROOT, run_cli, run_tool

sys.path.insert(0, str(ROOT / "tools"))
from bench_variants import apply_variant  # noqa: E402


def run(*args):
    return run_tool("bench_variants.py", *args)


def test_variants_rerun_each_side_as_pi_bench_ran_it(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    j = tmp_path / "r.json"
    r = run_cli("bench", str(ours), "--stock", str(twin), "--vram-budget", "0", "-p", "16", "-n", "0", "-r", "1",
                "-t", "2", "--ttft", "none", "--json", str(j))
    assert r.returncode == 0, r.stderr
    v = run(j, "--variant", "--poll 0", "--variant", "-t 1", "-p", 16, "-r", 2)
    assert v.returncode == 0, v.stderr[-2000:]
    assert "| side | as pi-bench | --poll 0 | -t 1 |" in v.stdout
    rows = [line for line in v.stdout.splitlines() if line.startswith(("| stock |", "| ours |"))]
    assert len(rows) == 2 and all(len(row.split("|")) == 6 for row in rows)
    assert v.stdout.count("round 2 ours [-t 1]: pp16 ") == 1
    # a variant's option replaces the one the side has (llama-bench would run both values)
    assert apply_variant(["-ngl", "0", "-lm", "none"], 2, "-lm auto -t 1 --poll 0") == \
        (["-ngl", "0", "-lm", "auto", "--poll", "0"], 1)


def test_bad_input_is_one_line_before_any_run(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"threads": 2, "ours": {"binary": "/nonexistent/llama-bench", "model": str(ours), "args": []}}))
    for args, msg in [(["--variant=--poll"], "'--poll': give each option one value"),
                      (["--variant", "-t x"], "-t needs a number in '-t x'"),
                      (["--sides", "stock_ot"], "has the sides ours, not stock_ot"),
                      (["-r", "0"], "-p and -r must be at least 1")]:
        bad = run(j, *args)
        assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(msg), (args, bad.stderr)
    missing = run(tmp_path / "nope.json")
    assert missing.returncode != 0 and "not a pi-bench JSON" in missing.stderr
    failing = run(j, "-r", "1")
    assert failing.returncode != 0 and failing.stderr.strip().startswith("bench_variants: ours [as pi-bench]: ")
