"""Our file over llama.cpp's RPC backend (issue 20): an rpc-server on 127.0.0.1 stands in for a second
host. The model's layers on the remote run our FFN there and write the local run's text; a peer of the
other build is refused at the handshake, as each build speaks its own protocol (patches/0008)."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

import pytest

from powerinfer_gguf import build
from powerinfer_gguf.rpc import PATCHED_PROTOCOL_MAJOR, RpcError, server_version

PROMPT = "Hello world, this is a test. The quick brown fox"


@contextlib.contextmanager
def rpc_server(side: str, log_path):
    """That side's ggml-rpc-server (CPU, one thread) on a free port; yields the endpoint once it accepts."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(build.bin_path(side, "ggml-rpc-server")), "-p", str(port), "-t", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while True:
                assert proc.poll() is None, f"rpc-server exited: {log_path.read_text()[-2000:]}"
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert time.time() < deadline, "rpc-server did not listen within 30 s"
                time.sleep(0.2)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def complete(side: str, model, rpc: str | None = None) -> subprocess.CompletedProcess:
    """16 greedy tokens from that side's llama-completion, every layer on the RPC host if given"""
    args = [str(build.bin_path(side, "llama-completion")), "-m", str(model), "-p", PROMPT, "-n", "16",
            "--temp", "0", "-no-cnv", "--no-warmup", "-t", "1", "-c", "256"]
    if rpc:
        args += ["-ngl", "99", "--rpc", rpc, "-v"]  # -v: the log names each layer's device
    return subprocess.run(args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_layers_on_a_remote_host_write_the_local_text(tiny_pi, tmp_path):
    _, ours, _ = tiny_pi
    local = complete("patched", ours)
    assert local.returncode == 0, local.stderr[-2000:]
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        remote = complete("patched", ours, rpc=endpoint)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "layer   0 assigned to device RPC0" in remote.stderr
    assert remote.stdout == local.stdout and len(local.stdout) > len(PROMPT)


def counters(model, endpoint: str | None = None) -> dict:
    script = Path(__file__).with_name("rpc_counters.py")
    r = subprocess.run([sys.executable, str(script), str(model), *([endpoint] if endpoint else [])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_op_counts_on_the_remote_host_as_it_does_locally(tiny_pi, tmp_path):
    """The op's counters are a tensor in the remote's memory (no pointer crosses the wire): a decode
    with every layer on the RPC host counts what the local run counts, read back over RPC."""
    _, ours, _ = tiny_pi
    local = counters(ours)
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        remote = counters(ours, endpoint)
    assert local["remote_layers"] == 0 and remote["remote_layers"] == len(remote["counters"])
    assert all(tokens == 4 and predicted > 0 for predicted, _, tokens in local["counters"])
    assert remote["counters"] == local["counters"]


def test_a_peer_of_the_other_build_is_refused_at_the_handshake(tiny_pi, tmp_path):
    _, ours, twin = tiny_pi
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        r = complete("patched", ours, rpc=endpoint)
    assert r.returncode != 0
    assert "RPC server version mismatch: 7.0.0" in r.stderr
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        r = complete("stock", twin, rpc=endpoint)
    assert r.returncode != 0
    assert "RPC server version mismatch: 107.0.0" in r.stderr


def test_each_build_answers_with_its_protocol(tmp_path):
    with rpc_server("patched", tmp_path / "rpc.log") as endpoint:
        assert server_version(endpoint) == (PATCHED_PROTOCOL_MAJOR, 0, 0)
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        assert server_version(endpoint)[0] == 7


def test_llama_refuses_a_stock_host_in_one_line_before_loading(tiny_pi, tmp_path):
    from powerinfer_gguf import Llama

    _, ours, _ = tiny_pi
    with rpc_server("stock", tmp_path / "stock-rpc.log") as endpoint:
        with pytest.raises(RpcError, match=rf"RPC host {endpoint} speaks protocol 7\.0\.0, this build 107: run the "
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
