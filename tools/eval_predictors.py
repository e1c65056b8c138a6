#!/usr/bin/env python3
"""Per-layer recall and precision of a converted model's predictors on text calibration never saw.

    python tools/eval_predictors.py MODEL.pi.gguf [TEXT_FILE ...] [--tokens 4096]

Default text: the license texts in /usr/share/common-licenses (not the default calibration corpus).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from powerinfer_gguf.predictor import evaluate_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text", nargs="*")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    files = [Path(t) for t in a.text] or sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    text = "\n\n".join(p.read_text(errors="replace") for p in files)
    q = evaluate_file(a.model, text, a.tokens)
    print(f"{a.model} on {len(files)} file(s), {a.tokens} tokens")
    print("layer  actual  predicted  recall  precision")
    for i, x in enumerate(q):
        print(f"{i:5d}  {x.actual:6.3f}  {x.predicted:9.3f}  {x.recall:6.4f}  {x.precision:9.3f}")
    print(f"mean   {sum(x.actual for x in q) / len(q):6.3f}  {sum(x.predicted for x in q) / len(q):9.3f}  "
          f"{sum(x.recall for x in q) / len(q):6.4f}  {sum(x.precision for x in q) / len(q):9.3f}")


if __name__ == "__main__":
    main()
