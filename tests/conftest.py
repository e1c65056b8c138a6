"""Shared fixtures: small models made on the fly (once per session); and the helpers several test
files need (test files import them: `from conftest import ...`)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# "Hello world, this is a test. The quick brown fox jumps" in the llama SPM vocabulary every
# synthetic model carries (BOS first)
TOKENS = [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889, 450, 4996, 17354, 1701, 29916, 432, 17204]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny synthetic ReLU LLaMA (GQA, 4 layers) as F32 GGUF plus its HF checkpoint."""
    from powerinfer_gguf.synth import synthesize

    d = tmp_path_factory.mktemp("tiny")
    res = synthesize(d / "tiny.gguf", "tiny", outtype="f32", hf_dir=d / "hf", progress=False)
    return res, d / "hf"


@pytest.fixture(scope="session")
def tiny_pi(tiny_model, tmp_path_factory):
    """The tiny model through pi-convert (F32): our sparse GGUF and its stock twin."""
    from powerinfer_gguf.convert import convert

    res, hf = tiny_model
    d = tmp_path_factory.mktemp("tiny-pi")
    ours, twin = d / "tiny.pi.gguf", d / "tiny.stock.gguf"
    convert(hf, ours, outtype="f32", stock=twin, calib_tokens=1536, progress=False, log=lambda m: None)
    return res, ours, twin


# --- loading a model quietly ----------------------------------------------------------------------


def pi_llama(path, upstream: bool = False, **kw):
    """powerinfer_gguf.Llama (or, upstream=True, llama_cpp.Llama) on a small file: 2 threads,
    a small context, no log; keyword arguments override."""
    if upstream:
        from llama_cpp import Llama
    else:
        from powerinfer_gguf import Llama
    kw = {"n_ctx": 256, "n_batch": 64, "n_threads": 2, "verbose": False, **kw}
    return Llama(str(path), **kw)


def eval_logits(path, tokens, one_by_one: bool = False, **kw):
    """Logits of every position and the model: one eval of the whole sequence, or one token per
    eval (decode)."""
    llm = pi_llama(path, logits_all=True, **kw)
    if one_by_one:
        for t in tokens:
            llm.eval([t])
    else:
        llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)]), llm


# --- commands -------------------------------------------------------------------------------------


def run_cli(command: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m powerinfer_gguf COMMAND ARGS` (what pi-COMMAND runs), output captured."""
    return subprocess.run([sys.executable, "-m", "powerinfer_gguf", command, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def run_tool(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python tools/NAME ARGS` with the checkout on PYTHONPATH, output captured."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    """The command failed with exit status 1 and one line on stderr that contains ``fragment``
    (and nothing else: no progress line, so nothing ran before the error)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and fragment in lines[0], (r.returncode, r.stderr[-2000:])


# --- the OpenAI-compatible server -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model, log_path, *args, timeout: float = 120):
    """`python -m llama_cpp.server --model MODEL ARGS` on a free port; yields (base URL, process)
    once /v1/models answers; stopped on exit. Its output goes to log_path."""
    port = free_port()
    with _server([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", "2",
                  "--host", "127.0.0.1", "--port", str(port), *map(str, args)], port, log_path, timeout) as up:
        yield up


@contextlib.contextmanager
def pi_serve(model, log_path, *args, timeout: float = 120):
    """`pi-serve MODEL ARGS` (python -m powerinfer_gguf serve) on a free port, as llama_server."""
    port = free_port()
    with _server([sys.executable, "-m", "powerinfer_gguf", "serve", str(model), "-t", "2", "--host", "127.0.0.1",
                  "--port", str(port), *map(str, args)], port, log_path, timeout) as up:
        yield up


@contextlib.contextmanager
def _server(cmd, port, log_path, timeout):
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_up(base, proc, log_path, timeout, httpx)
            yield base, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_until_up(base, proc, log_path, timeout, httpx) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, open(log_path).read()[-2000:]
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.5)


# --- the C side's text ----------------------------------------------------------------------------


def c_sources() -> list[tuple[str, str]]:
    """(name, C text) of each patch (the lines it adds) and of each file under csrc/ (our own C/C++
    sources, once they live there): where tests read what the C side names and computes."""
    out = []
    for p in sorted((ROOT / "patches").glob("*.patch")):
        added = [ln[1:] for ln in p.read_text().splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        out.append((p.name, "\n".join(added)))
    csrc = ROOT / "csrc"
    if csrc.is_dir():
        out += [(str(p.relative_to(ROOT)), p.read_text(errors="replace")) for p in sorted(csrc.rglob("*")) if p.is_file()]
    return out
