"""Summarize tools/cpu16-kernel.sh runs: per configuration and share of rows, the median over
rounds of the kernel's GB/s, of dense mat-vec's GB/s in the same invocation, and of their ratio.

    python3 tools/kernel_summary.py kernel-options.txt [n_layer]   (8 unless told: us/op)
"""
from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(r"^cfg=(?P<cfg>\S+) round=(?P<round>\d+) \| (?P<what>dense \(ggml mat-vec\)|[0-9]+%) \| "
                  r"(?P<ms>[0-9.]+) \| (?P<gbps>[0-9.]+) \| (?P<share>[0-9]+)% \|")


def summarize(lines, n_layer: int = 8) -> str:
    dense = {}                      # (cfg, round) -> dense GB/s
    rows = defaultdict(list)        # (cfg, what) -> [(round, ms, GB/s)]
    order = []
    for line in lines:
        m = LINE.match(line.strip())
        if not m:
            continue
        cfg, rnd, what = m["cfg"], int(m["round"]), m["what"]
        if cfg not in order:
            order.append(cfg)
        if what.startswith("dense"):
            dense[cfg, rnd] = float(m["gbps"])
        else:
            rows[cfg, what].append((rnd, float(m["ms"]), float(m["gbps"])))
    if not order:
        raise SystemExit("no kernel-bench lines found (want 'cfg=... round=N | ...' lines)")
    # the smallest share (one neuron) is the op's fixed cost: report it in us per op
    out = ["| deal/prefetch/bundle/fire/threads | rows | us/op | GB/s (median) | dense GB/s | share of dense (median) | rounds |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for cfg in order:
        for what in sorted({w for c, w in rows if c == cfg}, key=lambda w: int(w[:-1])):
            runs = rows[cfg, what]
            gb = statistics.median(g for _, _, g in runs)
            us = statistics.median(ms for _, ms, _ in runs) * 1e3 / n_layer
            dn = statistics.median(dense[cfg, r] for r, _, _ in runs if (cfg, r) in dense)
            ratio = statistics.median(g / dense[cfg, r] for r, _, g in runs if (cfg, r) in dense)
            out.append(f"| {cfg} | {what} | {us:.1f} | {gb:.1f} | {dn:.1f} | {100 * ratio:.0f}% | {len(runs)} |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(f, int(sys.argv[2]) if len(sys.argv) > 2 else 8))
