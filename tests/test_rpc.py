"""Our file over llama.cpp's RPC backend (issue 20): an rpc-server on 127.0.0.1 stands in for a second
host. The model's layers on the remote run our FFN there and write the local run's text; a peer of the
other build is refused at the handshake, as each build speaks its own protocol (patches/0008)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import free_port, run_tool

import pytest

from powerinfer_gguf import build
from powerinfer_gguf.rpc import PATCHED_PROTOCOL_MAJOR, RpcError, local_server, server_version

PROMPT = "Hello world, this is a test. The quick brown fox"


def rpc_server(side: str, log_path):
    """That side's ggml-rpc-server (CPU, one thread) on a free port; yields the endpoint once it accepts."""
    return local_server(build.bin_path(side, "ggml-rpc-server"), 1, log_path)


def complete(side: str, model, rpc: str | None = None) -> subprocess.CompletedProcess:
    """16 greedy tokens from that side's llama-completion, every layer on the RPC host if given"""
    args = [str(build.bin_path(side, "llama-completion")), "-m", str(model), "-p", PROMPT, "-n", "16",
            "--temp", "0", "-no-cnv", "--no-warmup", "-t", "1", "-c", "256"]
    if rpc:
        args += ["-ngl", "99", "--rpc", rpc, "-v"]  # -v: the log names each layer's device
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=300,
                          stdin=subprocess.DEVNULL)


def test_layers_on_a_remote_host_write_the_local_text(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    local = complete("patched", ours)
    assert local.returncode == 0, local.stderr[-2000:]
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        remote = complete("patched", ours, rpc=endpoint)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "layer   0 assigned to device RPC0" in remote.stderr
    assert remote.stdout == local.stdout and len(local.stdout) > len(PROMPT)


def test_a_plain_file_is_split_between_hosts_as_stock_splits_it(tiny_pi, tmp_path):
    """A file without our layout, two hosts and the user's tensor split (-ts 1,3): each layer on the
    device stock puts it on (our hook sets llama.cpp's split only for budgets per device)."""
    _, _, twin = tiny_pi

    def layers(side: str) -> list[str]:
        with rpc_server(side, tmp_path / f"{side}-a.log") as a, rpc_server(side, tmp_path / f"{side}-b.log") as b:
            r = subprocess.run([str(build.bin_path(side, "llama-completion")), "-m", str(twin), "-p", "Hello", "-n", "1",
                                "-no-cnv", "--no-warmup", "-t", "1", "-c", "256", "-ngl", "99", "--rpc", f"{a},{b}",
                                "-ts", "1,3", "-v"], capture_output=True, text=True, errors="replace", timeout=300,
                                stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-2000:]
        return re.findall(r"layer +\d+ assigned to device \w+", r.stderr)

    ours = layers("patched")
    assert ours == layers("stock") and any("RPC0" in x for x in ours) and any("RPC1" in x for x in ours)


def counters(model, *endpoints: str, budget: str = "0", reserve: int | None = None) -> dict:
    """tests/rpc_counters.py in a process of its own: each layer's device, its counters of a
    14-token prompt and of 4 decoded tokens, and 12 greedy tokens of text"""
    args = [sys.executable, str(Path(__file__).with_name("rpc_counters.py")), str(model), "--budget", budget]
    args += [f"--rpc={ep}" for ep in endpoints] + ([f"--reserve={reserve}"] if reserve is not None else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_remote_cpu_runs_the_sparse_op_for_prompts_and_decode(tiny_pi, tmp_path):
    """The op's counters are a tensor in the remote's memory (no pointer crosses the wire), and the
    remote device says it is a CPU (patches/0008): a prompt's ubatch and each decoded token run the
    sparse op there, counting what the local run counts, read back over RPC."""
    _, ours, _ = tiny_pi
    local = counters(ours)
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        remote = counters(ours, endpoint, budget=f"{endpoint}=1GiB")
    assert set(local["devices"]) == {"CPU"} and set(remote["devices"]) == {"RPC0"}
    # the prompt's ubatch: 14 tokens with BOS (the last layer computes the last one only)
    assert local["prompt"][0][2] == 14 and all(predicted > 0 for predicted, _, _ in local["prompt"])
    assert all(tokens == 4 and predicted > 0 for predicted, _, tokens in local["decode"])
    assert remote["prompt"] == local["prompt"] and remote["decode"] == local["decode"]
    assert remote["text"] == local["text"] and len(local["text"]) > 0


def _layer_bytes(model, n_ctx: int) -> tuple[list[int], int]:
    """What each layer costs the device that holds it whole (its tensors and its KV cache, F16, for
    n_ctx tokens), and the output layer's bytes: the planner's own sums, from the file"""
    import gguf

    r = gguf.GGUFReader(model)
    size = {t.name: int(t.n_bytes) for t in r.tensors}
    shape = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    n_layer = 1 + max(int(n.split(".")[1]) for n in size if n.startswith("blk."))
    layers = []
    for il in range(n_layer):
        kv = n_ctx * 2 * (shape[f"blk.{il}.attn_k.weight"][1] + shape[f"blk.{il}.attn_v.weight"][1])
        layers.append(sum(b for n, b in size.items() if n.startswith(f"blk.{il}.")) + kv)
    out = size["output_norm.weight"] + size.get("output.weight", size["token_embd.weight"])
    return layers, out


def test_budgets_per_device_give_each_host_its_layers(tiny_pi, tmp_path):
    """Two rpc-servers stand in for two hosts, each a CPU: budgets per host put the last two layers
    (and the output) on the second, the one before on the first, the first layer here. Every host
    runs the sparse op on its layers: the same counters and text as everything here."""
    _, ours, _ = tiny_pi
    layers, out = _layer_bytes(ours, 256)
    reserve = 16 << 20
    slack = min(layers) // 2  # less than a layer: the budgets hold exactly these layers
    local = counters(ours)
    with rpc_server("patched", tmp_path / "a.log") as a, rpc_server("patched", tmp_path / "b.log") as b:
        budget = f"{a}={reserve + layers[1] + slack},{b}={reserve + out + layers[2] + layers[3] + slack}"
        remote = counters(ours, a, b, budget=budget, reserve=reserve)
    assert remote["devices"] == ["CPU", "RPC0", "RPC1", "RPC1"]
    assert remote["prompt"] == local["prompt"] and remote["decode"] == local["decode"]
    assert remote["text"] == local["text"]


def test_a_peer_of_the_other_build_is_refused_at_the_handshake(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        r = complete("patched", ours, rpc=endpoint)
    assert r.returncode != 0
    assert "RPC server version mismatch: 7.0.0" in r.stderr
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        r = complete("stock", twin, rpc=endpoint)
    assert r.returncode != 0
    assert f"RPC server version mismatch: {PATCHED_PROTOCOL_MAJOR}.0.0" in r.stderr


def test_each_build_answers_with_its_protocol(tmp_path):
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        assert server_version(endpoint) == (PATCHED_PROTOCOL_MAJOR, 0, 0)
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        assert server_version(endpoint)[0] == 7


def test_llama_refuses_a_stock_host_in_one_line_before_loading(tiny_pi, tmp_path):
    from powerinfer_gguf import Llama

    _, ours, _ = tiny_pi
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        with pytest.raises(RpcError, match=rf"RPC host {endpoint} speaks protocol 7\.0\.0, this build {PATCHED_PROTOCOL_MAJOR}: run the "
                                           r"ggml-rpc-server of the patched build there") as e:
            Llama(str(ours), rpc=[endpoint], vram_budget=1 << 30, verbose=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("endpoint, fragment", [
    ("localhost", "give HOST:PORT"), ("localhost:0", "give HOST:PORT"), (":50052", "give HOST:PORT"),
])
def test_bad_rpc_hosts_are_one_line(tiny_pi, endpoint, fragment):
    from powerinfer_gguf import Llama

    with pytest.raises(RpcError, match=fragment):
        Llama(str(tiny_pi[1]), rpc=[endpoint], verbose=False)


def test_a_host_with_no_server_is_one_line(tiny_pi):
    from powerinfer_gguf import Llama

    port = free_port()  # nothing listens there
    with pytest.raises(RpcError, match=f"RPC host 127.0.0.1:{port}: no rpc-server answered"):
        Llama(str(tiny_pi[1]), rpc=[f"127.0.0.1:{port}"], verbose=False)


@pytest.mark.parametrize("budget, error", [
    ("{ep}=1GiB,RPC9=1GiB", r"no device RPC9 \(devices: .*RPC0 \(127\.0\.0\.1:\d+\)"),
    ("{ep}=1GiB,RPC0=2GiB", r"vram budget: 127\.0\.0\.1:\d+ and RPC0 are the same device, RPC0"),
    ("{ep}=", r"'127\.0\.0\.1:\d+=' is not DEVICE=SIZE"),
    ("{ep}=lots", r"bad size 'lots'"),
    ("CPU=1GiB", r"device_budgets: no device CPU \(this model's devices: RPC0 \(127\.0\.0\.1:\d+, CPU\)\)"),
    ("{ep}=99999GiB", r"the budget of RPC0 99999\.00 GiB exceeds RPC0 \(127\.0\.0\.1:\d+, CPU\)'s"),
    ("1GiB", r"no GPU device .*an RPC host's CPU takes a budget of its own: vram_budget='HOST:PORT=SIZE' in Python"),
    ("{ep}=1MiB", r"the budget of RPC0 .* cannot hold the output layer .*, or no budget for this device$"),
])
def test_bad_budgets_per_device_are_one_line(tiny_pi, tmp_path, budget, error):
    """Run in a process of its own, as a host once registered stays for the process"""
    _, ours, _ = tiny_pi
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        code = ("import sys\nfrom powerinfer_gguf import Llama\n"
                f"Llama({str(ours)!r}, rpc=[{endpoint!r}], vram_budget={budget.format(ep=endpoint)!r}, verbose=False)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert re.search(error, last), last


def test_rpc_bench_times_both_sides_here_and_over_rpc(tiny_pi, tmp_path):
    """tools/rpc_bench.py: each build's rpc-server started here, the four runs, a table of both"""
    _, ours, twin = tiny_pi
    out = tmp_path / "rpc.json"
    r = run_tool("rpc_bench.py", ours, "--stock", twin, "-t", "1", "-p", "8", "-n", "4", "-r", "1", "--hosts", "1",
                 "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"\| over RPC \(-ngl 99\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", r.stdout)
    assert re.search(r"ours: RPC costs a decoded token -?[\d.]+ ms", r.stdout)
    runs = json.loads(out.read_text())["runs"]
    assert all(runs[s][w][m][0] > 0 for s in ("ours", "stock") for w in ("here", "rpc") for m in ("pp", "tg"))
    again = run_tool("rpc_bench.py", ours, "--stock", twin, "--json", out, timeout=60)
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1] == f"rpc_bench: {out} exists; give a new path"


def test_a_budget_names_only_the_hosts_of_its_own_call(tiny_pi, tmp_path):
    """ggml keeps a host registered for the process: a later Llama that does not list it cannot
    give it layers by its HOST:PORT or its RPC name; rpc= may be one string, as llama.cpp's --rpc"""
    _, ours, _ = tiny_pi
    with rpc_server("patched", tmp_path / "a.log") as a, rpc_server("patched", tmp_path / "b.log") as b:
        code = ("from powerinfer_gguf import Llama\n"
                f"llm = Llama({str(ours)!r}, rpc='{a},{b}', vram_budget='{b}=1GiB', n_ctx=128, verbose=False)\n"
                "print([p.device for p in llm.placement()])\n"
                "llm.close()\n"
                "del llm  # a host serves one client at a time\n"
                "for budget in ('" + a + "=1GiB', 'RPC0=1GiB'):\n"
                "    try:\n"
                f"        Llama({str(ours)!r}, rpc=[{b!r}], vram_budget=budget, verbose=False)\n"
                "    except ValueError as e:\n"
                "        print(e)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == str(["RPC1"] * 4)
    assert lines[1].startswith(f"no device {a} (devices: CPU") and f"RPC1 ({b})" in lines[1] and "RPC0" not in lines[1]
    assert lines[2].startswith("no device RPC0 (devices: CPU")
