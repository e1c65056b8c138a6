"""Where a prompt ubatch's time goes in our graph, node by node: ours at a VRAM budget, one ubatch
of -p tokens, each graph node computed on its own and waited for (llama.cpp's eval callback asks
for every node), so each node's time is its own. The time between one node's end and the next
node's start is the scheduler's work there: a new split's input copies (weights in CPU memory
brought to the GPU, activations between backends) and launches.

    PYTHONPATH=. LLAMA_CPP_LIB_PATH=<patched bin> python tools/node_profile.py OURS.gguf \
        [--vram-budget 10GiB] [--n-ctx 544] [-p 512] [-t 16] [--top 15] [--random-tokens] [--json OUT.json]

Waiting after every node adds a few microseconds each: compare the sum with the plain run printed
next to it (the same ubatch, no callback). Prints time by kind of node (our FFN's parts by name,
the rest by op) and the slowest nodes.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import time
from collections import defaultdict

from powerinfer_gguf import Llama  # noqa: E402  (loads our libllama: before anything else)

import llama_cpp  # noqa: E402  (the binding Llama loaded)


class _Tensor(ctypes.Structure):
    """The head of ggml's struct ggml_tensor (ggml.h, llama.cpp 0c1e57098), as far as its name"""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(os.environ.get("LLAMA_CPP_LIB_PATH", os.path.dirname(llama_cpp.__file__) + "/lib"),
                                   "libggml-base.so"))
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_backend_buffer_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_name.restype = ctypes.c_char_p
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def kind_of(name: str, op: str) -> str:
    """A node's group: our FFN's nodes by their graph name (ffn_pi_*), the others by op"""
    base = name.split("-")[0]
    return f"{op} ({base})" if base.startswith("ffn_pi") else op


class NodeClock:
    """The eval callback: asks for every node, stamps its start (ask) and end (data)"""

    def __init__(self):
        self.ggml = _ggml_base()
        self.nodes: list[dict] = []
        self.t_last_end: float | None = None
        self.t_start = 0.0
        self.callback = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, t, ask, _user):
        now = time.perf_counter()
        if ask:
            self.t_start = now
            return True
        tensor = ctypes.cast(t, ctypes.POINTER(_Tensor)).contents
        between = 0.0 if self.t_last_end is None else self.t_start - self.t_last_end
        buf = self.ggml.ggml_backend_buffer_name(tensor.buffer).decode() if tensor.buffer else "?"
        name = tensor.name.decode(errors="replace")
        self.nodes.append({"name": name, "op": self.ggml.ggml_op_desc(t).decode(),
                           "buffer": buf, "ms": (now - self.t_start) * 1e3, "before_ms": between * 1e3})
        if name.startswith("ffn_pi_count"):
            self.nodes[-1]["rows"], self.nodes[-1]["kept"] = self._rows_kept(t, tensor)
        self.t_last_end = time.perf_counter()
        return True

    def _rows_kept(self, t, tensor) -> tuple[int, int]:
        """A gather's rows and those some token selects (its count, tokens per row, is F32 [1, n])"""
        n = tensor.ne[0] * tensor.ne[1]
        counts = (ctypes.c_float * n)()
        self.ggml.ggml_backend_tensor_get(t, counts, 0, 4 * n)
        return n, sum(1 for c in counts if c > 0)


def decode_once(ctx, tokens: list[int]) -> float:
    """One ubatch of the tokens into an empty cache; seconds"""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    t0 = time.perf_counter()
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
        raise SystemExit("node_profile: llama_decode failed")
    llama_cpp.llama_synchronize(ctx)
    return time.perf_counter() - t0


def profile(path: str, budget: str, n_ctx: int, n_tokens: int, threads: int,
            random_tokens: bool = False) -> tuple[list[dict], float]:
    llm = Llama(path, vram_budget=budget, n_ctx=n_ctx, n_batch=n_tokens, n_ubatch=n_tokens, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    if random_tokens:  # as llama-bench sends them
        rng = random.Random(0)
        tokens = [rng.randrange(5, llm.n_vocab()) for _ in range(n_tokens)]
    else:
        tokens = [(7 + 13 * i) % (llm.n_vocab() - 10) + 5 for i in range(n_tokens)]
    decode_once(llm.ctx, tokens)  # warm-up
    plain = min(decode_once(llm.ctx, tokens) for _ in range(2))
    clock = NodeClock()
    params = llm.context_params
    params.cb_eval = clock.callback
    params.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(llm.model, params)  # a second context: its own buffers
    if not ctx:
        raise SystemExit("node_profile: could not create the profiling context")
    try:
        decode_once(ctx, tokens)  # warm-up, then the run recorded
        clock.nodes.clear()
        clock.t_last_end = None
        decode_once(ctx, tokens)
    finally:
        llama_cpp.llama_free(ctx)
    return clock.nodes, plain


def summary(nodes: list[dict], plain_s: float, n_tokens: int, top: int) -> str:
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for n in nodes:
        k = kind_of(n["name"], n["op"])
        by_kind[k][0] += n["ms"]
        by_kind[k][1] += 1
    between = sum(n["before_ms"] for n in nodes)
    total = sum(n["ms"] for n in nodes) + between
    lines = [f"plain ubatch of {n_tokens} tokens: {plain_s * 1e3:.1f} ms ({n_tokens / plain_s:.1f} t/s); "
             f"node by node: {total:.1f} ms over {len(nodes)} nodes, of which between nodes (split inputs, "
             f"launches) {between:.1f} ms", "", "| kind | ms | nodes | share |", "|---|---:|---:|---:|"]
    for k, (ms, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {k} | {ms:.2f} | {count} | {100 * ms / total:.1f}% |")
    lines.append(f"| between nodes | {between:.2f} | | {100 * between / total:.1f}% |")
    rows = sum(n.get("rows", 0) for n in nodes)
    if rows:
        kept = sum(n.get("kept", 0) for n in nodes)
        lines.append(f"\nrows in CPU memory gathered for the GPU: {kept} of {rows} ({100 * kept / rows:.1f}%: "
                     "the union of the rows the ubatch's tokens select)")
    lines += ["", f"slowest {top} nodes (ms, ms before it):"]
    for n in sorted(nodes, key=lambda n: -(n["ms"] + n["before_ms"]))[:top]:
        lines.append(f"  {n['ms']:8.3f} {n['before_ms']:8.3f}  {n['op']:<14} {n['name']:<28} [{n['buffer']}]")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--vram-budget", default="0")
    ap.add_argument("--n-ctx", type=int, default=544)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--random-tokens", action="store_true", help="random tokens (as llama-bench), not a fixed sequence")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.n_prompt < 1 or a.n_prompt > a.n_ctx:
        raise SystemExit(f"node_profile: -p {a.n_prompt} must be 1..--n-ctx ({a.n_ctx})")
    if a.json and os.path.exists(a.json):
        raise SystemExit(f"node_profile: {a.json} exists; give a new path")
    if not os.path.isfile(a.model):
        raise SystemExit(f"node_profile: {a.model}: no such file")
    nodes, plain = profile(a.model, a.vram_budget, a.n_ctx, a.n_prompt, a.threads, a.random_tokens)
    print(summary(nodes, plain, a.n_prompt, a.top))
    if a.json:
        with open(a.json, "x") as f:
            json.dump({"model": a.model, "vram_budget": a.vram_budget, "n_prompt": a.n_prompt,
                       "plain_ms": plain * 1e3, "nodes": nodes}, f)


if __name__ == "__main__":
    main()
