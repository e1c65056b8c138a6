"""Run by test_rpc.py in a process of its own (an RPC host, once registered, stays for the process):
    python tests/rpc_counters.py MODEL [HOST:PORT]
loads MODEL with powerinfer_gguf.Llama, every layer on the RPC host when one is given (Llama(rpc=):
the planner takes its device for the GPU), evaluates a prompt, then 4 tokens one at a time, and prints each layer's
counters of those 4 (predicted, fired, tokens) as JSON: read back from wherever the op ran."""
import json
import sys

from powerinfer_gguf import Llama


def main() -> None:
    model, endpoint = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    llm = Llama(model, vram_budget=(1 << 30) if endpoint else 0, rpc=[endpoint] if endpoint else None,
                n_ctx=256, n_threads=1, verbose=False)
    llm.eval(llm.tokenize(b"Hello world, this is a test."))
    llm.reset_sparse_stats()
    for t in (450, 4996, 17354, 1701):
        llm.eval([t])
    print(json.dumps({"remote_layers": sum(p.attn_gpu for p in llm.placement()),
                      "counters": [[s.predicted, s.fired, s.tokens] for s in llm.sparse_stats()]}))


if __name__ == "__main__":
    main()
