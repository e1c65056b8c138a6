"""tools/bench_variants.py: pi-bench's sides run again with variants of llama-bench's settings."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, run_cli


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench_variants.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


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
    bad = run(j, "--variant=--poll")
    assert bad.returncode != 0 and bad.stderr.strip().endswith("'--poll': give each option one value")
    none = run(j, "--sides", "stock_ot")
    assert none.returncode != 0 and "none of the sides stock_ot in" in none.stderr
