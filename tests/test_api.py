"""The Python API on our files: llama-cpp-python's completion, streaming, chat, embeddings and its
OpenAI-compatible server, with the sparse engine doing the decoding."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def llm(tiny_pi):
    from powerinfer_gguf import Llama
    _, ours, _ = tiny_pi
    return Llama(str(ours), n_ctx=256, n_threads=2, verbose=False, seed=1)


def test_is_a_llama_cpp_llama(llm):
    import llama_cpp
    assert isinstance(llm, llama_cpp.Llama) and llm.sparse_mode == "sparse"


def test_completion_decodes_sparse(llm):
    llm.reset_sparse_stats()
    out = llm("The history of", max_tokens=12, temperature=0.0)
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] >= 1
    st = llm.sparse_stats()
    # generated tokens after the first go one at a time through the sparse FFN
    assert st[0].tokens >= out["usage"]["completion_tokens"] - 1 >= 0
    assert 0 < st[0].computed_share < 0.5


def test_streaming_equals_one_shot(llm):
    one = llm("Once upon a time", max_tokens=10, temperature=0.0)["choices"][0]["text"]
    chunks = list(llm("Once upon a time", max_tokens=10, temperature=0.0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == one


def test_chat_completion(llm):
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "Say hello."}],
                                     max_tokens=8, temperature=0.0)
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)


def test_embeddings(tiny_pi):
    from powerinfer_gguf import Llama
    _, ours, _ = tiny_pi
    emb = Llama(str(ours), n_ctx=128, n_threads=2, verbose=False, embedding=True)
    v = emb.embed("a short sentence")
    assert len(v) > 0 and all(isinstance(x, float) for x in (v[0] if isinstance(v[0], list) else v))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_our_file(tiny_pi, tmp_path):
    """`python -m llama_cpp.server` on our file: completion, chat, and a streamed completion."""
    import httpx

    _, ours, _ = tiny_pi
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(ours), "--n_ctx", "256",
                             "--n_threads", "2", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        r = httpx.post(base + "/v1/completions", json={"prompt": "The history of", "max_tokens": 8,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        with httpx.stream("POST", base + "/v1/completions", json={"prompt": "Once", "max_tokens": 6,
                                                                "stream": True}, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        json.loads(events[0][len("data: "):])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
