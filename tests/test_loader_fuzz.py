"""Hostile and corrupt files (tests/loader_cases.py): each gives a clear error or runs; none crashes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_every_corruption_errors_or_runs(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    r = subprocess.run([sys.executable, str(HERE / "loader_cases.py"), str(tmp_path), str(ours)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    lines = r.stdout.splitlines()
    started = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("START ")]
    assert r.returncode == 0 and lines and lines[-1] == "DONE", \
        f"loader died (rc {r.returncode}) on case {started[-1] if started else '?'}: {r.stderr[-1500:]}"
    results = [ln for ln in lines if ln.startswith("CASE ")]
    assert len(results) == len(started) >= 60
    bad = []
    for ln in results:
        head, outcome = ln.split(" -> ", 1)
        _, name, expect, fragment = head.split(" ", 3)
        fragment = eval(fragment)  # repr() of a plain string written by the driver
        if expect == "error" and not (outcome.startswith("ERR ") and fragment in outcome):
            bad.append(ln)
        if expect == "run" and outcome != "RAN":
            bad.append(ln)
        if outcome.startswith("ERR ") and "\n" in outcome:
            bad.append(ln)
    assert not bad, "\n".join(bad)
    ran = sum(ln.endswith("-> RAN") for ln in results)
    assert 0 < ran < len(results)
