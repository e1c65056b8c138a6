"""llama.cpp's RPC backend from Python: each host checked first, then registered with ggml (what
llama.cpp's `--rpc HOST:PORT` does), so that a model's layers can be given to it.

The check is the protocol's own HELLO, sent here before ggml connects: ggml's client aborts the
process on a peer of another protocol, and a stock rpc-server speaks another (patches/0008), so the
user gets a one-line error naming the host instead. Written by hand: no library speaks this protocol.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import time

# patches/0008-rpc-protocol.patch: the patched build's protocol major (stock llama.cpp's is 7)
PATCHED_PROTOCOL_MAJOR = 108
STOCK_PROTOCOL_MAJOR = 7
_CMD_HELLO = 14       # ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14", in every protocol version
_CMD_DEVICE_COUNT = 15  # the next one, in stock's protocol 7 and ours
_CONN_CAPS_SIZE = 24  # transport.h: the transports a peer offers; all zero = plain TCP

_registered: set[str] = set()


class RpcError(ValueError):
    """A host that cannot take our layers, in one line"""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"RPC host {endpoint!r}: give HOST:PORT (port 1-65535)")
    return host, int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _ask(endpoint: str, device_count: bool, timeout: float = 10.0) -> tuple[int, int, int, int]:
    """HELLO (and, if asked, DEVICE_COUNT) to the rpc-server at HOST:PORT: major, minor, patch, devices"""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(s, 8))
            if size != 4 + _CONN_CAPS_SIZE:
                raise ConnectionError(f"a HELLO answer of {size} bytes")
            major, minor, patch, _ = _recv_exact(s, 4)
            _recv_exact(s, _CONN_CAPS_SIZE)
            n = 0
            if device_count:
                s.sendall(struct.pack("<BQ", _CMD_DEVICE_COUNT, 0))
                if struct.unpack("<Q", _recv_exact(s, 8))[0] != 4:
                    raise ConnectionError("an unexpected DEVICE_COUNT answer")
                (n,) = struct.unpack("<I", _recv_exact(s, 4))
    except TimeoutError:
        raise RpcError(f"RPC host {endpoint}: no answer in {timeout:.0f} s (an rpc-server serves one client at a "
                       "time: is another process or Llama using it?)") from None
    except (OSError, ConnectionError) as e:
        raise RpcError(f"RPC host {endpoint}: no rpc-server answered ({e})") from None
    return major, minor, patch, n


def server_version(endpoint: str) -> tuple[int, int, int]:
    """The protocol version (major, minor, patch) the rpc-server at HOST:PORT answers HELLO with"""
    return _ask(endpoint, False)[:3]


def device_count(endpoint: str) -> int:
    """How many devices the rpc-server at HOST:PORT offers (either build's)"""
    return _ask(endpoint, True)[3]


def check_server(endpoint: str) -> None:
    """Raises RpcError unless the host speaks the patched build's protocol"""
    major, minor, patch = server_version(endpoint)
    if major != PATCHED_PROTOCOL_MAJOR:
        raise RpcError(f"RPC host {endpoint} speaks protocol {major}.{minor}.{patch}, this build "
                       f"{PATCHED_PROTOCOL_MAJOR}: run the ggml-rpc-server of the patched build there "
                       "(a stock one cannot run our FFN)")


def add_servers(endpoints: list[str], libdir: str) -> None:
    """Checks every host, then registers each once with ggml (libggml*.so in libdir, already loaded)"""
    for ep in endpoints:
        check_server(ep)
    rpc = ctypes.CDLL(os.path.join(libdir, "libggml-rpc.so"))
    ggml = ctypes.CDLL(os.path.join(libdir, "libggml.so"))
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    for ep in endpoints:
        if ep in _registered:
            continue
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise RpcError(f"RPC host {ep}: the server offers no device")
        ggml.ggml_backend_register(reg)
        _registered.add(ep)


def devices(libdir: str) -> list[tuple[str, str]]:
    """ggml's devices as (name, description): an RPC host's devices are named RPC<n>, described by
    their HOST:PORT"""
    base = ctypes.CDLL(os.path.join(libdir, "libggml.so"))  # the registry; names from ggml-base, beneath it
    base.ggml_backend_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_dev_get.restype = ctypes.c_void_p
    base.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    out = []
    for i in range(base.ggml_backend_dev_count()):
        dev = base.ggml_backend_dev_get(i)
        out.append((base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode()))
    return out


def device_name(label: str, known: list[tuple[str, str]]) -> str:
    """The device a budget's label means: a device's name, or the one device of an RPC host HOST:PORT"""
    names = [n for n, _ in known]
    if label in names:
        return label
    on_host = [n for n, desc in known if n.startswith("RPC") and desc == label]
    if len(on_host) == 1:
        return on_host[0]
    if on_host:
        raise RpcError(f"RPC host {label} has devices {', '.join(on_host)}: give each its own budget by name")
    raise RpcError(f"no device {label} (devices: {', '.join(f'{n} ({d})' for n, d in known)}; an RPC host "
                   "needs rpc=[HOST:PORT])")


@contextlib.contextmanager
def local_server(binary: str | os.PathLike, threads: int, log_path: str | os.PathLike, timeout: float = 30.0):
    """A ggml-rpc-server (its CPU device, `threads` threads) on 127.0.0.1 at a free port, standing
    in for a host; yields its HOST:PORT once it accepts, stops it on exit."""
    from .serve import free_port

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(binary), "-p", str(port), "-t", str(threads)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RpcError(f"{binary} exited (rc {proc.returncode}); its log: {log_path}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                if time.time() > deadline:
                    raise RpcError(f"{binary} did not listen within {timeout:.0f} s; its log: {log_path}")
                time.sleep(0.2)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
