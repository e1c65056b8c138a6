"""pi-serve: llama-cpp-python's OpenAI-compatible server over our patched llama.cpp, with a VRAM
budget as PowerInfer's server takes it and defaults that hold concurrent clients.

llama-cpp-python's server answers one request at a time; its default interrupt_requests=True ends
a stream as soon as another request waits (8 clients: 11 of 12 streams came back empty, issue 18),
so pi-serve queues requests instead: each completes. Bad requests get OpenAI-style 400s naming the
problem (the app answers most with 500s, invalid JSON with plain text). A plain GGUF serves as
stock.

``--parallel N`` serves through the patched tree's own llama-server instead: N slots decoded
together (continuous batching), so N streams share each pass over the weights; the sparse op takes
their tokens as one ubatch (the rows any of them selects)."""
from __future__ import annotations

import json

from .model_file import budget_bytes, check_gguf


def model_settings(model: str, budget: int, n_ctx: int, threads: int | None) -> dict:
    """llama_cpp.server ModelSettings fields: the budget and the context its KV reserve is sized
    for as our run-time keys; weights read into memory (2 MB pages, pinned where there is a GPU)."""
    from .format import Keys
    s = {"model": model, "n_ctx": n_ctx, "use_mmap": False, "n_gpu_layers": -1 if budget != 0 else 0, "verbose": False,
         "kv_overrides": None}
    if threads:
        s["n_threads"] = s["n_threads_batch"] = threads
    if budget != 0:
        s["kv_overrides"] = [f"{Keys.Runtime.VRAM_BUDGET}=int:{budget}", f"{Keys.Runtime.VRAM_CTX}=int:{n_ctx}"]
    return s


def describe(llm, budget: int) -> str:
    """One line: the mode a loaded file runs in and where its weights are."""
    from .runtime import _lib, _placement_of
    code = int(_lib().llama_pi_model_sparse(llm.model))
    mode = {0: "stock (no sparse layout)", 1: "sparse FFN", 2: "dense FFN"}[code]
    if budget == 0:
        return f"{mode}, CPU only"
    pl = _placement_of(llm.model)
    if not pl:
        return f"{mode}, layers on the GPU as llama.cpp offloads them"
    return (f"{mode}, VRAM budget {'auto' if budget < 0 else f'{budget / 2**30:.2f} GiB'}: attention of "
            f"{sum(p.attn_gpu for p in pl)}/{len(pl)} layers on the GPU, {sum(p.split for p in pl)} split, "
            f"FFN rows on the GPU {sum(p.gpu_rows for p in pl)}/{sum(p.neurons for p in pl)}")


# the routes whose bodies are checked before the app sees them, and the model of each body
CHECKED_ROUTES = {"/v1/completions": "CreateCompletionRequest", "/v1/chat/completions": "CreateChatCompletionRequest"}


def check_request(path: str, body: bytes) -> str | None:
    """What is wrong with a request body for ``path``, in one line without server paths; None when
    nothing is. max_tokens is bounded alike on both routes: a whole number >= 1, or null for up to
    the context's end."""
    import pydantic
    from llama_cpp.server import types
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        return f"the body is not valid JSON: {e}"
    if not isinstance(data, dict):
        return "the body must be a JSON object"
    if path == "/v1/chat/completions":
        problem = _check_messages(data.get("messages"))
        if problem:
            return problem
    if path == "/v1/completions" and "prompt" not in data:
        return "prompt: required"
    mt = data.get("max_tokens")
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
        return f"max_tokens: {mt!r} is not a whole number >= 1 (or null: up to the end of the context)"
    try:
        getattr(types, CHECKED_ROUTES[path])(**data)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"{where}: {first['msg']}" + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool", "function")  # llama_cpp's ChatCompletionRequestMessage


def _check_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages: give a list of at least one message"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}]: must be an object with a role and content"
        if m.get("role") not in CHAT_ROLES:
            return f"messages[{i}].role: {m.get('role')!r} is not one of {', '.join(CHAT_ROLES)}"
    return None


class RequestChecks:
    """ASGI middleware: reads a checked route's body, answers 400 with an OpenAI-style error when
    check_request finds a problem, else hands the same body on (later receives, such as a client's
    disconnect, pass through)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHECKED_ROUTES:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before its request was whole
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        problem = check_request(scope["path"], body)
        if problem is not None:
            from starlette.responses import JSONResponse
            error = {"message": problem, "type": "invalid_request_error", "param": None, "code": None}
            return await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def serve(model: str, vram_budget: str, host: str, port: int, n_ctx: int, threads: int | None, log,
          parallel: int | None = None) -> None:
    """Checks everything cheap first, loads the model, logs what it runs, then serves until stopped;
    ``parallel``: that many slots, through llama-server."""
    check_gguf(model)
    budget = budget_bytes(model, vram_budget)
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: must be within 1..65535")
    if n_ctx < 1:
        raise ValueError(f"--n-ctx {n_ctx}: must be at least 1")
    if parallel is not None and parallel < 1:
        raise ValueError(f"--parallel {parallel}: must be at least 1")
    from . import Llama
    Llama  # noqa: B018  (libllama before numpy: see cli.bench_cmd)
    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from .runtime import auto_vram_budget, check_patched
    check_patched()
    if budget != 0 and auto_vram_budget() is None:
        raise ValueError(f"--vram-budget {vram_budget}: this machine has no GPU device (give 0 to serve from the CPU)")
    if parallel is not None:
        return serve_parallel(model, budget, host, port, n_ctx, threads, parallel, log)
    app = server_app.create_app(server_settings=ServerSettings(host=host, port=port, interrupt_requests=False),
                                model_settings=[ModelSettings(**model_settings(model, budget, n_ctx, threads))])
    log(f"pi-serve: {model}: {describe(server_app._llama_proxy(), budget)}; http://{host}:{port}/v1")
    uvicorn.run(RequestChecks(app), host=host, port=port, log_level="warning")


def server_command(binary: str, model: str, port: int, n_ctx: int, threads: int | None, parallel: int,
                   placement: list[str], host: str = "127.0.0.1") -> list[str]:
    """A llama-server of N slots of n_ctx tokens (its -c is their sum), no web UI and no --fit
    (where weights go is ``placement``'s: our planner's budget, or stock's -ngl / -ot)."""
    cmd = [binary, "-m", model, "--host", host, "--port", str(port), "-c", str(n_ctx * parallel),
           "-np", str(parallel), "-fit", "off", "--no-webui", *placement]
    return cmd + (["-t", str(threads), "-tb", str(threads)] if threads else [])


def ours_placement(budget: int, ours: bool, n_kv: int) -> list[str]:
    """What the one-slot server does, as llama-server options: weights read into memory, every
    layer offered to the GPU under a budget; for our file, the budget and the KV cells it reserves
    for as our run-time keys."""
    from .format import Keys
    args = ["-lm", "none", "-ngl", "0" if budget == 0 else "999"]
    if ours and budget != 0:
        args += ["--override-kv", f"{Keys.Runtime.VRAM_BUDGET}=int:{budget},{Keys.Runtime.VRAM_CTX}=int:{n_kv}"]
    return args


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proxy_app(upstream: str):
    """An ASGI app handing every request to ``upstream`` (llama-server) and streaming its answer
    back as it comes; a client that leaves closes its upstream request, and llama-server then
    frees that slot. Put behind RequestChecks, llama-server's slots get the one-slot server's
    request checks (it answers invalid JSON with a 500 and takes unknown roles and max_tokens -1)."""
    import anyio
    import httpx
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    client = httpx.AsyncClient(base_url=upstream, timeout=None)
    hop = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        req = Request(scope, receive)
        up = client.build_request(req.method, scope["path"], params=req.query_params, content=await req.body(),
                                  headers=[(k, v) for k, v in req.headers.items() if k not in hop])
        r = await client.send(up, stream=True)

        async def body():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await r.aclose()

        headers = {k: v for k, v in r.headers.items() if k not in hop}
        await StreamingResponse(body(), status_code=r.status_code, headers=headers)(scope, receive, send)

    return app


class ServerProcess:
    """llama-server as a child: its output drained on a thread, the loader's placement lines
    logged; ``wait_ready`` returns once the model is loaded and it listens; ``on_exit`` is called
    if it stops after that."""

    def __init__(self, cmd: list[str], log, on_exit=None):
        import subprocess
        import threading

        self.log, self.last, self.on_exit = log, "", on_exit
        self.ready, self.ended = threading.Event(), threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.last = line.strip() or self.last
            if "powerinfer:" in line:
                self.log(line.split("powerinfer:", 1)[1].strip())
            elif "listening on" in line:
                self.ready.set()
        self.proc.wait()
        self.ended.set()
        if self.ready.is_set() and self.on_exit is not None:
            self.on_exit()

    def wait_ready(self) -> None:
        while not self.ready.wait(0.2):
            if self.ended.is_set():
                raise RuntimeError(f"llama-server did not start (exit {self.proc.returncode}): {self.last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def _stop_front() -> None:
    """llama-server stopped while serving: so does pi-serve (uvicorn exits on SIGTERM)."""
    import os
    import signal
    os.kill(os.getpid(), signal.SIGTERM)


def serve_parallel(model: str, budget: int, host: str, port: int, n_ctx: int, threads: int | None,
                   parallel: int, log) -> None:
    """llama-server with N slots behind the same request checks as the one-slot server: it listens
    on a private port, pi-serve on the user's. The placement logged is the loader's own (planning
    it here would hold a GPU context beside the server)."""
    import uvicorn

    from .build import bin_path
    from .model_file import is_sparse_file
    ours = is_sparse_file(model)
    mode = ("sparse FFN" if ours else "stock (no sparse layout)") + (", CPU only" if budget == 0 else "")
    private = free_port()
    cmd = server_command(str(bin_path("patched", "llama-server")), model, private, n_ctx, threads, parallel,
                         ours_placement(budget, ours, n_ctx * parallel))
    server = ServerProcess(cmd, log, on_exit=_stop_front)
    try:
        server.wait_ready()
        log(f"pi-serve: {model}: {mode}; {parallel} slots of {n_ctx} tokens (llama-server); http://{host}:{port}/v1")
        uvicorn.run(RequestChecks(proxy_app(f"http://127.0.0.1:{private}")), host=host, port=port, log_level="warning")
    finally:
        server.stop()
    if server.ended.is_set() and server.proc.returncode not in (0, -15):
        raise RuntimeError(f"llama-server stopped (exit {server.proc.returncode}): {server.last}")
