"""The Python API on our files: llama-cpp-python's completion, streaming, chat, embeddings and its
OpenAI-compatible server, with the sparse engine doing the decoding."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import llama_server, pi_llama, pi_serve


@pytest.fixture(scope="module")
def llm(tiny_pi):
    _, ours, _ = tiny_pi
    return pi_llama(ours, n_batch=512, seed=1)


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
    _, ours, _ = tiny_pi
    emb = pi_llama(ours, n_ctx=128, n_batch=512, embedding=True)
    v = emb.embed("a short sentence")
    # the file states no pooling (llama.cpp's default for llama: none): one vector per token
    n_embd = int(emb.metadata["llama.embedding_length"])
    assert len(v) == len(emb.tokenize(b"a short sentence"))
    assert all(len(row) == n_embd and all(isinstance(x, float) for x in row) for row in v)


def test_openai_server_serves_our_file(tiny_pi, tmp_path):
    """`python -m llama_cpp.server` on our file: completion, chat, and a streamed completion."""
    import httpx

    _, ours, _ = tiny_pi
    with llama_server(ours, tmp_path / "server.log", "--n_ctx", "256") as (base, _):
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


MAX_TOKENS = 12


def _complete(client, model, prompt):
    """One answer, not streamed: (text, finish_reason)."""
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].text, r.choices[0].finish_reason


def _stream(client, model, prompt, close_after=None):
    """One answer, streamed: (text, finish_reason) of the chunks; or, with close_after, the
    stream closed by the client after that many chunks: ("closed", chunks read)."""
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    text, finish = "", None
    for n, chunk in enumerate(stream, 1):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
        if close_after is not None and n >= close_after:
            stream.close()
            return "closed", n
    return text, finish


SERVERS = [pytest.param([], id="one-slot"), pytest.param(["--parallel", "4"], id="parallel-4")]


@pytest.mark.parametrize("server_args", SERVERS)
def test_pi_serve_eight_concurrent_clients(tiny_pi, tmp_path, server_args):
    """pi-serve with its defaults (and with 4 slots decoded together), 8 clients at once through
    the official openai package: 4 not streamed, 4 streamed of which 2 close their stream after 2
    chunks. Every answer not abandoned is complete (greedy, so each streamed text equals the
    one-shot text of the same prompt, with a finish reason), and the server still answers
    afterwards. It logs what it runs at start."""
    import openai

    _, ours, _ = tiny_pi
    prompts = ["The history of", "Once upon a time", "In the beginning", "The quick brown fox"]
    with pi_serve(ours, tmp_path / "server.log", "--n-ctx", "512", *server_args) as (base, proc):
        assert "sparse FFN, CPU only" in open(tmp_path / "server.log").read()
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        jobs = ([(_complete, p, None) for p in prompts] + [(_stream, p, None) for p in prompts[:2]]
                + [(_stream, p, 2) for p in prompts[2:]])
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(fn, client, model, p, *([close] if fn is _stream else [])) for fn, p, close in jobs]
            answers = [f.result(timeout=120) for f in futures]
        one_shot = dict(zip(prompts, answers[:4]))
        for text, finish in answers[:4]:
            assert isinstance(text, str) and finish in ("length", "stop"), (text, finish)
        for (text, finish), p in zip(answers[4:6], prompts[:2]):
            assert (text, finish) == one_shot[p]
        assert answers[6:] == [("closed", 2), ("closed", 2)]
        assert proc.poll() is None, open(tmp_path / "server.log").read()[-2000:]
        assert _complete(client, model, prompts[0]) == one_shot[prompts[0]]


@pytest.mark.parametrize("args,fragment", [
    (["--vram-budget", "1GiB"], "no GPU device"),
    (["--vram-budget", "lots"], "bad size"),
    (["--port", "70000"], "--port 70000"),
    (["--parallel", "0"], "--parallel 0"),
])
def test_pi_serve_bad_options_are_one_line(tiny_pi, args, fragment):
    from conftest import assert_one_line_error, run_cli
    _, ours, _ = tiny_pi
    assert_one_line_error(run_cli("serve", ours, *args, timeout=120), fragment)


def test_pi_serve_missing_model_is_one_line(tmp_path):
    from conftest import assert_one_line_error, run_cli
    assert_one_line_error(run_cli("serve", tmp_path / "none.gguf"), "no such model file")


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/chat/completions", b"{bad json", "not valid JSON"),
    ("/v1/chat/completions", b'{"model": "x"}', "messages: give a list"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role: 'wizard'"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens: -1"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -1}', "max_tokens: -1"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', "max_tokens: 0"),
    ("/v1/completions", b'{"max_tokens": 4}', "prompt: required"),
    ("/v1/completions", b"[1, 2]", "a JSON object"),
])
def test_pi_serve_names_bad_requests(path, body, fragment):
    from powerinfer_gguf.serve import check_request
    problem = check_request(path, body)
    assert problem is not None and fragment in problem and "/" not in problem.replace("JSON", ""), problem


@pytest.mark.parametrize("server_args", SERVERS)
def test_pi_serve_answers_bad_requests_with_400(tiny_pi, tmp_path, server_args):
    """Through pi-serve (either server): each bad request gets an OpenAI-style 400 naming the
    problem; the same keep-alive connection then serves a good request; null max_tokens stays
    allowed."""
    import httpx
    _, ours, _ = tiny_pi
    with pi_serve(ours, tmp_path / "server.log", "--n-ctx", "256", *server_args) as (base, proc):
        with httpx.Client(base_url=base + "/v1", timeout=60) as c:
            for body in (b"{bad json", b'{"messages": [{"role": "wizard", "content": "hi"}]}',
                         b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
                         b'{"prompt": "hi", "max_tokens": -1}'):
                route = "/completions" if b"prompt" in body else "/chat/completions"
                r = c.post(route, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
            r = c.post("/completions", json={"prompt": "The history of", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            r = c.post("/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": None,
                                                  "stop": ["."]})
            assert r.status_code == 200, r.text
        assert proc.poll() is None
