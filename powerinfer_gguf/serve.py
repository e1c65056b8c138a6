"""pi-serve: llama-cpp-python's OpenAI-compatible server over our patched llama.cpp, with a VRAM
budget as PowerInfer's server takes it and defaults that hold concurrent clients.

llama-cpp-python's server answers one request at a time; its default interrupt_requests=True ends
a stream as soon as another request waits (8 clients: 11 of 12 streams came back empty, issue 18),
so pi-serve queues requests instead: each completes. A plain GGUF serves as stock."""
from __future__ import annotations

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
    """One line: the mode the file runs in and where its weights are."""
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


def serve(model: str, vram_budget: str, host: str, port: int, n_ctx: int, threads: int | None, log) -> None:
    """Checks everything cheap first, loads the model, logs what it runs, then serves until stopped."""
    check_gguf(model)
    budget = budget_bytes(model, vram_budget)
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: must be within 1..65535")
    if n_ctx < 1:
        raise ValueError(f"--n-ctx {n_ctx}: must be at least 1")
    from . import Llama
    Llama  # noqa: B018  (libllama before numpy: see cli.bench_cmd)
    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from .runtime import auto_vram_budget, check_patched
    check_patched()
    if budget != 0 and auto_vram_budget() is None:
        raise ValueError(f"--vram-budget {vram_budget}: this machine has no GPU device (give 0 to serve from the CPU)")
    app = server_app.create_app(server_settings=ServerSettings(host=host, port=port, interrupt_requests=False),
                                model_settings=[ModelSettings(**model_settings(model, budget, n_ctx, threads))])
    log(f"pi-serve: {model}: {describe(server_app._llama_proxy(), budget)}; http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
