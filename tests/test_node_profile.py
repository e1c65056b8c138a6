"""tools/node_profile.py: time per graph node of one prompt ubatch (here on the CPU, budget 0)."""
from __future__ import annotations

import json

from conftest import run_tool


def run(*args):
    return run_tool("node_profile.py", *args, timeout=300)


def test_profile_names_our_nodes_and_refuses_to_overwrite(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    out = tmp_path / "nodes.json"
    r = run(ours, "-p", 16, "--n-ctx", 64, "-t", 1, "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plain ubatch of 16 tokens" in r.stdout and "| between nodes |" in r.stdout
    nodes = json.loads(out.read_text())["nodes"]
    assert any(n["op"] == "PI_SPARSE_FFN" for n in nodes)  # budget 0: the sparse op, per layer
    assert any(n["name"].startswith("ffn_pi_score") for n in nodes)
    assert all(n["ms"] >= 0 and n["before_ms"] >= 0 for n in nodes)
    again = run(ours, "-p", 16, "--n-ctx", 64, "--json", out)
    assert again.returncode != 0 and again.stderr.strip().endswith("exists; give a new path")
    rand = run(ours, "-p", 8, "--n-ctx", 64, "-t", 1, "--top", 0, "--random-tokens")
    assert rand.returncode == 0 and "plain ubatch of 8 tokens" in rand.stdout, rand.stderr[-2000:]
    bad = run(ours, "-p", 100, "--n-ctx", 64)
    assert bad.returncode != 0 and "-p 100 must be 1..--n-ctx (64)" in bad.stderr
