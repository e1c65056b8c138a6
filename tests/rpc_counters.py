"""Run by test_rpc.py in a process of its own (an RPC host, once registered, stays for the process):
    python tests/rpc_counters.py MODEL [--rpc HOST:PORT]... [--budget SPEC] [--reserve BYTES]
loads MODEL with powerinfer_gguf.Llama (vram_budget=SPEC, budgets per device; the compute reserve
fixed when given), evaluates a 14-token prompt (BOS first), then 4 tokens one at a time, then writes 12 greedy
tokens, and prints as JSON: each layer's device, each layer's counters (predicted, fired, tokens) of
the prompt and of the 4 tokens, read back from wherever the op ran, and the text."""
import argparse
import json

from powerinfer_gguf import Llama
from powerinfer_gguf.format import Keys

PROMPT = b"Hello world, this is a test. The quick brown fox"


def counters(llm) -> list[list[int]]:
    return [[s.predicted, s.fired, s.tokens] for s in llm.sparse_stats()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rpc", action="append", default=[])
    ap.add_argument("--budget", default="0")
    ap.add_argument("--reserve", type=int)
    a = ap.parse_args()
    overrides = {Keys.Runtime.VRAM_RESERVE: a.reserve} if a.reserve is not None else None
    llm = Llama(a.model, vram_budget=a.budget, rpc=a.rpc or None, kv_overrides=overrides, n_ctx=256, n_threads=1,
                verbose=False)
    tokens = llm.tokenize(PROMPT)
    llm.reset_sparse_stats()
    llm.eval(tokens)  # one ubatch of 14 tokens: more than a GPU's sparse limit (8)
    prompt = counters(llm)
    llm.reset_sparse_stats()
    for t in (450, 4996, 17354, 1701):
        llm.eval([t])
    decode = counters(llm)
    llm.reset()
    text = llm.create_completion(PROMPT.decode(), max_tokens=12, temperature=0.0)["choices"][0]["text"]
    print(json.dumps({"devices": [p.device for p in llm.placement()], "prompt": prompt, "decode": decode,
                      "text": text}))


if __name__ == "__main__":
    main()
