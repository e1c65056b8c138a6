"""Hostile and corrupt variants of one of our GGUFs, for the loader tests (tests/test_loader_fuzz.py)
and the AddressSanitizer run (tools/asan-loader.sh).

Every key and tensor we add is corrupted in turn (wrong type, wrong value, wrong length, NaN, absent,
out-of-range rank), plus truncations and seeded random byte flips of the header. Each case says
whether the load must fail ("error", with a fragment the message must contain), must run ("run":
a value the engine reads safely, or never reads) or may do either ("any": random byte flips only).
`python tests/loader_cases.py DIR SRC [--budget]` runs them all in this process, one line per
case; a crash kills the process, and the last "START" line names the case. With --budget each
load plans a VRAM budget (no GPU needed: every part stays in CPU memory), so the planner's own
read of the file and the split of each layer's rows meet every corruption too. Each case's file is
written just before it runs and deleted after: 81 copies of even a tiny model are ~2.5 GB.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from powerinfer_gguf.format import field_item


@dataclass
class Case:
    name: str
    expect: str        # "error", "run", or "any" (error or run; never a crash)
    fragment: str = ""  # part of the error message, for "error"


@functools.lru_cache(maxsize=1)
def _source(src: Path):
    """src read once per process (parsing its 32000-token vocabulary is most of a rewrite's time):
    its architecture, its keys as (name, (value, vtype, sub)) and its tensors (views of the file)"""
    import gguf

    r = gguf.GGUFReader(src)
    keys = [(name, field_item(f)) for name, f in r.fields.items()
            if not name.startswith("GGUF.") and name != "general.architecture"]
    return r.fields["general.architecture"].contents(), keys, [(t.name, t.data) for t in r.tensors]


def _rewrite(src: Path, dst: Path, kv: Callable | None = None, tensors: Callable | None = None,
             extra: list | None = None, add_keys: list | None = None) -> None:
    """Copy src to dst; kv(name, value, vtype, sub) -> None (drop) or (value, vtype, sub);
    tensors(name, array) -> None (drop) or (name, array); extra tensors and keys appended."""
    import gguf

    arch, keys, source_tensors = _source(src)
    w = gguf.GGUFWriter(dst, arch)
    for name, item in keys:
        if kv is not None:
            item = kv(name, *item)
            if item is None:
                continue
        w.add_key_value(name, *item)
    for key, value, vtype in add_keys or []:
        w.add_key_value(key, value, vtype)
    for item in source_tensors:  # views of the source (the edits make new arrays): no copy
        if tensors is not None:
            item = tensors(*item)
            if item is None:
                continue
        w.add_tensor(item[0], item[1])
    for name, arr in extra or []:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_cases(src: Path, out: Path) -> list[tuple[Case, Path, Callable[[], None]]]:
    """Every case, its file's path and the function that writes that file (called when it runs)."""
    import gguf

    V = gguf.GGUFValueType
    r = gguf.GGUFReader(src)
    n_layer = int(r.fields["llama.block_count"].contents())
    n_embd = int(r.fields["llama.embedding_length"].contents())
    n_ff = int(r.fields["llama.feed_forward_length"].contents())
    last = n_layer - 1
    cases: list[tuple[Case, Path, Callable[[], None]]] = []

    def key_case(name, expect, fragment, key, new):
        def kv(k, value, vtype, sub):
            if k != key:
                return value, vtype, sub
            return None if new == "drop" else new
        p = out / f"{name}.gguf"
        cases.append((Case(name, expect, fragment), p, lambda: _rewrite(src, p, kv=kv)))

    def tensor_case(name, expect, fragment, fn, extra=None):
        p = out / f"{name}.gguf"
        cases.append((Case(name, expect, fragment), p, lambda: _rewrite(src, p, tensors=fn, extra=extra)))

    def edit(target, fn):
        return lambda n, a: fn(n, a) if n == target else (n, a)

    # keys
    key_case("version-2", "error", "unsupported format version", "powerinfer.format_version", (2, V.UINT32, None))
    key_case("version-str", "error", "format_version is not a uint32", "powerinfer.format_version", ("1", V.STRING, None))
    key_case("sparse-u32", "error", "powerinfer.sparse is not a bool", "powerinfer.sparse", (1, V.UINT32, None))
    key_case("sparse-false", "error", "ffn_down", "powerinfer.sparse", (False, V.BOOL, None))
    key_case("layout-bogus", "error", "unknown powerinfer.ffn_down_layout", "powerinfer.ffn_down_layout", ("columns", V.STRING, None))
    key_case("layout-absent", "error", "missing key powerinfer.ffn_down_layout", "powerinfer.ffn_down_layout", "drop")
    key_case("pred-act-gelu", "error", "unknown powerinfer.predictor.act", "powerinfer.predictor.act", ("gelu", V.STRING, None))
    key_case("pred-act-u32", "error", "powerinfer.predictor.act is not a string", "powerinfer.predictor.act", (0, V.UINT32, None))
    # keys only Python reads (pi-bench, pi-info): llama.cpp must load the file whatever they hold
    key_case("recall-short", "run", "", "powerinfer.predictor.recall", ([0.5], V.ARRAY, V.FLOAT32))
    key_case("recall-nan", "run", "", "powerinfer.predictor.recall", ([float("nan")] * n_layer, V.ARRAY, V.FLOAT32))
    key_case("calib-absent", "run", "", "powerinfer.calib.tokens", "drop")
    key_case("act-silu", "error", "needs a relu or drelu FFN", "llama.hidden_activation", ("silu", V.STRING, None))
    key_case("act-bogus", "error", "unsupported FFN activation", "llama.hidden_activation", ("swish9", V.STRING, None))
    # run-time keys a file may carry, with bad values (the Python API overrides sparse/all_active,
    # and an override wins, so a bad all_active in the file is not read)
    for name, key, value, vtype, fragment in (
            ("way-unknown", "powerinfer.runtime.ffn_way", "fast", V.STRING, "ffn_way = 'fast'"),
            ("way-int", "powerinfer.runtime.ffn_way", 2, V.INT32, "is not a string"),
            ("rt-all-str", "powerinfer.runtime.all_active", "yes", V.STRING, "")):
        p = out / f"{name}.gguf"
        keys = [(key, value, vtype)]
        cases.append((Case(name, "error" if fragment else "run", fragment), p,
                      lambda p=p, keys=keys: _rewrite(src, p, add_keys=keys)))

    # tensors, first and last layer
    for il in (0, last):
        b = f"blk.{il}."
        rank = r.get_tensor(next(i for i, t in enumerate(r.tensors) if t.name == b + "pi_pred_fc1.weight")).data.shape[0]
        tensor_case(f"L{il}-fc1-rank-huge", "error", "outside 1..", edit(b + "pi_pred_fc1.weight",
                    lambda n, a: (n, np.zeros((n_embd + n_ff + 1, n_embd), np.float32))))
        tensor_case(f"L{il}-fc1-transposed", "error", "pi_pred_fc1", edit(b + "pi_pred_fc1.weight",
                    lambda n, a: (n, np.ascontiguousarray(np.zeros((n_embd, rank + 1), np.float32)))))
        tensor_case(f"L{il}-fc2-rank-mismatch", "error", "pi_pred_fc2", edit(b + "pi_pred_fc2.weight",
                    lambda n, a: (n, np.zeros((n_ff, rank + 3), np.float32))))
        tensor_case(f"L{il}-fc2-nan", "run", "", edit(b + "pi_pred_fc2.weight",
                    lambda n, a: (n, np.full_like(a, np.nan))))
        tensor_case(f"L{il}-thr-short", "error", "pi_pred_threshold", edit(b + "pi_pred_threshold",
                    lambda n, a: (n, a[:-1].copy())))
        tensor_case(f"L{il}-thr-f16", "error", "has type f16", edit(b + "pi_pred_threshold",
                    lambda n, a: (n, a.astype(np.float16))))
        tensor_case(f"L{il}-thr-nan", "run", "", edit(b + "pi_pred_threshold", lambda n, a: (n, np.full_like(a, np.nan))))
        tensor_case(f"L{il}-thr-neginf", "run", "", edit(b + "pi_pred_threshold", lambda n, a: (n, np.full_like(a, -np.inf))))
        tensor_case(f"L{il}-thr-posinf", "run", "", edit(b + "pi_pred_threshold", lambda n, a: (n, np.full_like(a, np.inf))))
        tensor_case(f"L{il}-thr-absent", "error", "pi_pred_threshold", edit(b + "pi_pred_threshold", lambda n, a: None))
        tensor_case(f"L{il}-freq-long", "error", "pi_neuron_freq", edit(b + "pi_neuron_freq",
                    lambda n, a: (n, np.concatenate([a, a]))))
        tensor_case(f"L{il}-freq-nan", "run", "", edit(b + "pi_neuron_freq", lambda n, a: (n, np.full_like(a, np.nan))))
        tensor_case(f"L{il}-downt-transposed", "error", "ffn_down_t", edit(b + "ffn_down_t.weight",
                    lambda n, a: (n, np.ascontiguousarray(a.T))))
        tensor_case(f"L{il}-downt-absent", "error", "ffn_down_t", edit(b + "ffn_down_t.weight", lambda n, a: None))
        tensor_case(f"L{il}-downt-nan", "run", "", edit(b + "ffn_down_t.weight", lambda n, a: (n, np.full_like(a, np.nan))))
        tensor_case(f"L{il}-gate-f16", "error", "ffn_gate is f16 but ffn_up is f32", edit(b + "ffn_gate.weight",
                    lambda n, a: (n, a.astype(np.float16))))
        tensor_case(f"L{il}-gate-i32", "error", "has type i32", edit(b + "ffn_gate.weight",
                    lambda n, a: (n, np.zeros(a.shape, np.int32))))
        tensor_case(f"L{il}-up-bias", "error", "FFN biases", lambda n, a: (n, a),
                    extra=[(b + "ffn_up.bias", np.zeros(n_ff, np.float32))])

    # truncations and byte flips
    size = src.stat().st_size

    def truncated(p: Path, n: int) -> Callable[[], None]:
        return lambda: p.write_bytes(src.read_bytes()[:n])

    def flipped(p: Path, flips: list[tuple[int, int]]) -> Callable[[], None]:
        def write() -> None:
            buf = bytearray(src.read_bytes())
            for pos, byte in flips:
                buf[pos] = byte
            p.write_bytes(bytes(buf))
        return write

    for frac in (0.0005, 0.01, 0.3, 0.9, 0.9999):
        p = out / f"trunc-{frac}.gguf"
        cases.append((Case(f"trunc-{frac}", "error", ""), p, truncated(p, int(size * frac))))
    rng = np.random.default_rng(1234)
    header = min(size, _header_size(r))
    for i in range(24):
        flips = [(int(pos), int(rng.integers(0, 256))) for pos in rng.integers(0, header, size=int(rng.integers(1, 6)))]
        p = out / f"flip-{i:02d}.gguf"
        cases.append((Case(f"flip-{i:02d}", "any"), p, flipped(p, flips)))
    return cases


def _header_size(r) -> int:
    """Bytes before the tensor data (the KV section and tensor infos): where flips hurt the parser."""
    return int(min(t.data_offset for t in r.tensors))


def run_case(path: Path, budget: bool = False) -> str:
    """Load and generate a few tokens; 'RAN' or 'ERR <message>'. With budget: half the file's size,
    planned without a GPU, no compute reserve, no hand-off cost (so layers split)."""
    from powerinfer_gguf import Llama
    from powerinfer_gguf.format import Keys
    kw = {}
    if budget:
        kw = {"vram_budget": max(1, path.stat().st_size // 2),
              "kv_overrides": {Keys.Runtime.PLAN_WITHOUT_GPU: True, Keys.Runtime.VRAM_RESERVE: 0,
                               Keys.Runtime.SPLIT_COST_US: 0}}
    try:
        llm = Llama(str(path), n_ctx=64, n_threads=2, verbose=False, **kw)
        llm("Hello there", max_tokens=4, temperature=0.0)
        llm.close()
        return "RAN"
    except ValueError as e:
        return "ERR " + str(e).splitlines()[0]


if __name__ == "__main__":
    out, src = Path(sys.argv[1]), Path(sys.argv[2])
    budget = sys.argv[3:] == ["--budget"]
    out.mkdir(parents=True, exist_ok=True)
    for case, path, write in make_cases(src, out):
        print(f"START {case.name}", flush=True)
        write()
        outcome = run_case(path, budget)
        path.unlink()
        print(f"CASE {case.name} {case.expect} {case.fragment!r} -> {outcome}", flush=True)
    print("DONE", flush=True)
