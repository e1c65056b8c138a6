"""The patched libllama as llama-cpp-python loads it.

`import llama_cpp` loads the libllama that set-up copied into llama_cpp/lib (or the folder named by
LLAMA_CPP_LIB_PATH). We add a small C API (csrc/include/llama-powerinfer.h); this module declares it
for ctypes and reaches it through llama_cpp's own handle, without a second binding.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass


class NotPatchedError(RuntimeError):
    """The libllama that llama_cpp loaded is not ours (or not built from these patches/)."""


@dataclass(frozen=True)
class LibInfo:
    path: str
    api_version: int
    patch_series: str


def lib_info() -> LibInfo:
    """What the loaded libllama says of itself; NotPatchedError for a stock library."""
    import llama_cpp.llama_cpp as binding

    lib = binding._lib
    try:
        api = lib.llama_pi_api_version
        series = lib.llama_pi_patch_series
    except AttributeError:
        raise NotPatchedError(f"{lib._name} is a stock libllama (no llama_pi_api_version): "
                              "run `make setup` to install the patched build") from None
    api.restype, api.argtypes = ctypes.c_int32, []
    series.restype, series.argtypes = ctypes.c_char_p, []
    return LibInfo(lib._name, int(api()), series().decode())


def check_patched(expected_series: str | None = None) -> LibInfo:
    """Raise NotPatchedError unless the loaded lib is ours, built from ``expected_series``
    (default: the hash of this checkout's patches/)."""
    info = lib_info()
    if expected_series is None:
        from .build import patches_hash
        expected_series = patches_hash()
    if info.patch_series != expected_series:
        raise NotPatchedError(f"{info.path} was built from patch series {info.patch_series}, "
                              f"but patches/ is {expected_series}: run `make setup` again")
    return info


# --- the sparse engine from Python ----------------------------------------------------------------

class _LayerStatsC(ctypes.Structure):
    # include/llama-powerinfer.h: struct llama_pi_layer_stats
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_evals", "n_tokens", "n_rows", "n_predicted", "n_fired",
                 "cpu_bytes", "cpu_ns", "cpu_threads", "cpu_evals_tiles", "cpu_union")]


@dataclass(frozen=True)
class LayerStats:
    """What one layer's sparse FFN did, summed since load or the last reset."""

    layer: int
    tokens: int        # tokens through the sparse FFN (prompt tokens on the dense path not counted)
    neurons: int       # n_ff: neurons per token
    predicted: int     # neurons predicted active, summed over tokens: rows read
    fired: int         # of those, neurons with a non-zero activation
    cpu_bytes: int = 0    # bytes of FFN rows the CPU kernel processed, per token of a ubatch
                          # (decode: rows read from memory; rows on the GPU not counted)
    cpu_ns: int = 0       # wall time in the CPU kernel
    cpu_threads: int = 0  # threads of its last evaluation (0: the CPU kernel never ran)
    cpu_evals_tiles: int = 0  # CPU evaluations that took the tiles way (the others: pairs)
    cpu_union: int = 0        # rows any token of a ubatch selected, summed over CPU evaluations

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_ns / 1e6 / self.tokens if self.tokens else 0.0

    @property
    def cpu_gbps(self) -> float:
        """GB/s of rows processed by the CPU kernel while it ran (in decode: read from memory;
        a many-token ubatch counts a row once per token that uses it)."""
        return self.cpu_bytes / self.cpu_ns if self.cpu_ns else 0.0

    @property
    def predicted_per_token(self) -> float:
        return self.predicted / self.tokens if self.tokens else 0.0

    @property
    def computed_share(self) -> float:
        """Share of the layer's FFN rows computed per token (1.0 is dense)."""
        return self.predicted / (self.tokens * self.neurons) if self.tokens and self.neurons else 0.0

    @property
    def fired_share(self) -> float:
        return self.fired / (self.tokens * self.neurons) if self.tokens and self.neurons else 0.0

    @property
    def precision(self) -> float:
        """Share of the predicted neurons that really fired."""
        return self.fired / self.predicted if self.predicted else 0.0


class _PlacementC(ctypes.Structure):
    # include/llama-powerinfer.h: struct llama_pi_layer_placement
    _fields_ = [*((name, ctypes.c_int32) for name in ("n_rows", "gpu_rows", "attn_gpu", "split", "dev_rows")),
                ("device", ctypes.c_char * 32)]


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer's weights live after load (the VRAM-budget planner's decision)."""

    layer: int
    neurons: int       # FFN rows (n_ff)
    gpu_rows: int      # the hottest rows, held in a GPU's memory; the rest in CPU memory
    attn_gpu: bool     # attention, predictor and KV cache on a GPU
    split: bool        # the FFN runs as a GPU part and a CPU part, added
    dev_rows: int = 0  # rows planned where the layer runs (neurons when not split)
    device: str = "CPU"  # the device of its attention: "CPU" (this host's), "CUDA0", "RPC1" (an RPC host's), ...


def _bind_sparse_api(lib) -> None:
    if getattr(lib, "_pi_sparse_bound", False):
        return
    lib.llama_pi_model_sparse.restype = ctypes.c_int32
    lib.llama_pi_model_sparse.argtypes = [ctypes.c_void_p]
    lib.llama_pi_get_layer_stats.restype = ctypes.c_int32
    lib.llama_pi_get_layer_stats.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(_LayerStatsC)]
    lib.llama_pi_reset_stats.restype = None
    lib.llama_pi_reset_stats.argtypes = [ctypes.c_void_p]
    lib.llama_pi_get_layer_placement.restype = ctypes.c_int32
    lib.llama_pi_get_layer_placement.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(_PlacementC)]
    lib.llama_pi_plan.restype = ctypes.c_int32
    lib.llama_pi_plan.argtypes = [ctypes.POINTER(_PlanLayerC), ctypes.c_int32, _PlanParamsC, ctypes.POINTER(ctypes.c_int32)]
    lib.llama_pi_auto_vram_budget.restype = ctypes.c_int64
    lib.llama_pi_auto_vram_budget.argtypes = []
    lib._pi_sparse_bound = True


def _lib():
    import llama_cpp.llama_cpp as binding

    check_patched()
    _bind_sparse_api(binding._lib)
    return binding._lib


# --- the planner (src/llama-powerinfer-plan.cpp) ----------------------------------------------------

class _PlanLayerC(ctypes.Structure):
    # include/llama-powerinfer.h: struct llama_pi_plan_layer
    _fields_ = [("base_bytes", ctypes.c_uint64), ("row_bytes", ctypes.c_uint64), ("n_rows", ctypes.c_int32),
                ("gpu_rows", ctypes.c_int32), ("freq", ctypes.POINTER(ctypes.c_float))]


class _PlanParamsC(ctypes.Structure):
    # include/llama-powerinfer.h: struct llama_pi_plan_params
    _fields_ = [("output_bytes", ctypes.c_uint64), ("avail_bytes", ctypes.c_int64),
                ("n_gpu_layers_cap", ctypes.c_int32), ("split_cost_us", ctypes.c_int64)]


@dataclass(frozen=True)
class PlanLayer:
    """What one layer costs the planner: bytes read whole every token, bytes of one FFN row, the
    rows' firing frequencies hot to cold, and whether the GPU kernels read its row type."""

    base_bytes: int
    row_bytes: int
    freq: "object"  # 1-D float32 array
    gpu_rows: bool = True


def plan_placement(layers: list[PlanLayer], *, output_bytes: int, avail_bytes: int,
                   n_gpu_layers_cap: int = -1, split_cost_us: int = 70) -> tuple[int, list[int]]:
    """The planner llama.cpp runs at load, called directly: (n_gpu_layers as llama.cpp counts them,
    or -1 when the output layer does not fit; rows per layer kept with the layer on its device)."""
    import numpy as np

    freqs = []
    arr = (_PlanLayerC * max(1, len(layers)))()
    for i, l in enumerate(layers):
        if l.base_bytes < 0 or l.row_bytes < 0:
            raise ValueError(f"layer {i}: base_bytes and row_bytes must be >= 0")
        f = np.ascontiguousarray(l.freq, dtype=np.float32).reshape(-1)
        freqs.append(f)
        arr[i] = _PlanLayerC(l.base_bytes, l.row_bytes, len(f), int(bool(l.gpu_rows)),
                             f.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    rows = (ctypes.c_int32 * max(1, len(layers)))()
    params = _PlanParamsC(output_bytes, avail_bytes, n_gpu_layers_cap, split_cost_us)
    ngl = int(_lib().llama_pi_plan(arr, len(layers), params, rows))
    if ngl == -2:
        raise ValueError("llama_pi_plan refused its input")
    return ngl, [int(r) for r in rows[: len(layers)]]


def auto_vram_budget() -> int | None:
    """Bytes "auto" stands for (the first GPU's free memory less 512 MiB and 2% of its total, as
    llama.cpp's planner computes it), or None without a GPU."""
    b = int(_lib().llama_pi_auto_vram_budget())
    return None if b < 0 else b


def plan_file(path: str, budget: int, n_ctx: int, overrides: dict | None = None) -> list[LayerPlacement]:
    """The placement llama.cpp would make for this file and budget (bytes; -1: auto), planned and
    not loaded (llama_model_params.no_alloc: metadata only, no weights read or allocated);
    overrides: more run-time keys (int or bool values)."""
    import llama_cpp

    from .format import Keys

    _lib()
    keys = {Keys.Runtime.VRAM_BUDGET: int(budget), Keys.Runtime.VRAM_CTX: int(n_ctx), **(overrides or {})}
    kv = (llama_cpp.llama_model_kv_override * (len(keys) + 1))()
    for i, (k, v) in enumerate(keys.items()):
        kv[i].key = k.encode()
        if isinstance(v, bool):
            kv[i].tag, kv[i].value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, v
        else:
            kv[i].tag, kv[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(v)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = -1
    params.no_alloc = True
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # the mmap path cannot simulate its buffers
    params.kv_overrides = kv
    with _LoadErrors(quiet=True) as errors:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"{path}: {errors.message or 'cannot plan this file'}")
    try:
        return _placement_of(model)
    finally:
        llama_cpp.llama_model_free(model)


def _placement_of(model) -> list[LayerPlacement]:
    import llama_cpp

    lib = _lib()
    out = []
    for il in range(int(llama_cpp.llama_model_n_layer(model))):
        p = _PlacementC()
        if lib.llama_pi_get_layer_placement(model, il, ctypes.byref(p)) != 0:
            return []
        out.append(LayerPlacement(il, int(p.n_rows), int(p.gpu_rows), bool(p.attn_gpu), bool(p.split), int(p.dev_rows),
                                  p.device.decode()))
    return out


class _LoadErrors:
    """While loading, catch llama.cpp's error log lines (still passed on to llama-cpp-python's
    logger), so that a failed load can say why instead of llama-cpp-python's generic message."""

    def __init__(self, quiet: bool = False):
        self.message = ""
        self.quiet = quiet  # keep llama.cpp's log to ourselves (a plan, not a load the user asked for)

    def __enter__(self):
        import llama_cpp
        from llama_cpp import _logger

        self._upstream = _logger.llama_log_callback

        @llama_cpp.llama_log_callback
        def capture(level, text, user_data):
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (ggml.h; _logger.py's table is older)
                line = text.decode("utf-8", "replace").strip()
                if "error loading model:" in line:
                    self.message = line.split("error loading model:", 1)[1].strip()
                elif not self.message and line:
                    self.message = line
            if not self.quiet:
                self._upstream(level, text, user_data)

        self._capture = capture  # keep the ctypes callback alive
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import llama_cpp
        llama_cpp.llama_log_set(self._upstream, ctypes.c_void_p(0))
        return False


def _make_llama_class():
    import llama_cpp

    from .format import FFN_WAYS, Keys
    from .model_file import budget_bytes, device_budgets, is_per_device

    class Llama(llama_cpp.Llama):
        """llama_cpp.Llama over our patched llama.cpp, with PowerInfer-style sparse decoding.

        Everything upstream offers (completion, streaming, chat, embeddings, the OpenAI-style
        server) works as it does there; our options reach llama.cpp as kv overrides, so the
        binding is upstream's. A file without our metadata runs exactly as stock.

        vram_budget: bytes or a size string ("8GiB", "40%" of the weights, "auto": free VRAM less
            the planner's margin, llama_pi_auto_vram_budget); 0 runs on the CPU only. Above 0,
            llama.cpp's planner puts attention, KV cache and predictors of as many layers as fit
            on the GPU, then the hottest FFN rows; the rest stays in CPU memory. It logs its
            decision; ``placement()`` returns it. The KV reserve is sized for n_ctx.
        sparse: False computes the FFN densely over the same weights (the reference).
        all_active: compute every neuron on the sparse path (checks sparse == dense).
        use_mmap defaults to False here (upstream: True): only our own buffers get 2 MB pages
            (ggml_pi_advise_hugepages).
            Budgets per device: {DEVICE: SIZE} or "DEVICE=SIZE,DEVICE=SIZE", DEVICE a name
            (CUDA0, RPC1) or an RPC host's HOST:PORT. A GPU takes whole layers and the hottest rows
            of them (their other rows in this host's memory); a CPU of an RPC host takes whole
            layers, rows and all, and runs their sparse FFN itself; the first layers, those no
            budget holds, run here. A single size is the GPU's (the first local one, else the first
            of an RPC host).
        rpc: HOST:PORT of rpc-servers (the patched build's ggml-rpc-server), a list or one string
            "HOST:PORT,HOST:PORT" as llama.cpp's --rpc takes them, whose devices can take layers;
            each checked first: a host of another protocol (a stock rpc-server) is a one-line
            RpcError. Give each a budget in vram_budget. A host stays registered with ggml for the
            rest of the process (ggml cannot forget one); RPC device names count up in the order
            hosts were first given, so name hosts by HOST:PORT.
        ffn_way: how each part of the FFN runs, "auto" (chosen per ubatch from what it costs:
            docs/DESIGN.md, "ways") or one forced everywhere: "pairs", "tiles" (the sparse op's
            two CPU ways) or "dense" (GEMMs masked by the predictor). Every way computes the
            same neurons; forcing one is for tests and measurements.
        """

        def __init__(self, model_path: str, *, vram_budget: str | int = 0, sparse: bool = True,
                     all_active: bool = False, ffn_way: str = "auto", rpc: list[str] | str | None = None,
                     kv_overrides: dict | None = None, **kwargs):
            info = check_patched()
            hosts = [h.strip() for h in rpc.split(",")] if isinstance(rpc, str) else list(rpc or [])
            if hosts:  # before the budget: "auto" and the planner see the hosts' devices
                from .rpc import add_servers
                add_servers(hosts, os.path.dirname(info.path))
            if "n_gpu_layers" in kwargs and kwargs["n_gpu_layers"] not in (0, None):
                raise ValueError("n_gpu_layers: use vram_budget, which decides what goes on the GPU")
            overrides = dict(kv_overrides or {})  # keys the caller set win over the arguments
            if is_per_device(vram_budget):
                budgets = self._device_budgets(model_path, vram_budget, info.path, hosts)
                overrides.setdefault(Keys.Runtime.DEVICE_BUDGETS, ",".join(f"{n}={b}" for n, b in budgets.items()))
                budget = sum(budgets.values()) if all(b >= 0 for b in budgets.values()) else -1
            else:
                budget = budget_bytes(model_path, vram_budget)
                if budget != 0:
                    overrides.setdefault(Keys.Runtime.VRAM_BUDGET, int(budget))
            kwargs["n_gpu_layers"] = -1 if budget != 0 else 0
            # Weights read into our own buffer, not memory-mapped: only there can they get 2 MB pages
            # (ggml_pi_advise_hugepages), which the sparse FFN's scattered row reads need (docs/NOTES.md).
            kwargs.setdefault("use_mmap", False)
            overrides.setdefault(Keys.Runtime.SPARSE, bool(sparse))
            overrides.setdefault(Keys.Runtime.ALL_ACTIVE, bool(all_active))
            if ffn_way not in FFN_WAYS:
                raise ValueError(f"ffn_way={ffn_way!r}: must be one of {', '.join(FFN_WAYS)}")
            if ffn_way != "auto":
                overrides.setdefault(Keys.Runtime.FFN_WAY, ffn_way)
            if budget != 0:
                n_ctx = int(kwargs.get("n_ctx", 512) or 0)
                if n_ctx > 0:
                    overrides.setdefault(Keys.Runtime.VRAM_CTX, n_ctx)
            self.vram_budget = budget
            with _LoadErrors() as errors:
                try:
                    super().__init__(model_path, kv_overrides=overrides, **kwargs)
                except ValueError:
                    if errors.message:  # llama.cpp said why: say it in one line
                        raise ValueError(f"{model_path}: {errors.message}") from None
                    raise
            _bind_sparse_api(llama_cpp.llama_cpp._lib)

        @staticmethod
        def _device_budgets(model_path: str, spec, lib_path: str, hosts: list[str]) -> dict[str, int]:
            """{device name: bytes (-1 auto)} from budgets per device, hosts resolved to their device.
            Only this host's devices and those of `hosts` count: ggml keeps a host registered for
            the process, once any Llama named it."""
            from .rpc import device_name, devices

            known = [(n, d) for n, d in devices(os.path.dirname(lib_path)) if not n.startswith("RPC") or d in hosts]
            named: dict[str, int] = {}
            labels: dict[str, str] = {}
            for label, b in device_budgets(model_path, spec).items():
                name = device_name(label, known)
                if name in named:
                    raise ValueError(f"vram budget: {labels[name]} and {label} are the same device, {name}")
                named[name], labels[name] = b, label
            return named

        @property
        def sparse_mode(self) -> str:
            """'sparse', 'dense' (our layout, sparse=False) or 'stock' (a file without our layout)."""
            code = llama_cpp.llama_cpp._lib.llama_pi_model_sparse(self.model)
            return {0: "stock", 1: "sparse", 2: "dense"}[int(code)]

        def sparse_stats(self) -> list[LayerStats]:
            """Per layer: tokens, neurons predicted (rows read) and fired, and the CPU kernel's
            bytes read, time and threads, since load or reset. Empty for a file without our layout."""
            lib = llama_cpp.llama_cpp._lib
            out = []
            n_ff = self._n_ff()
            for il in range(self._n_layer()):
                st = _LayerStatsC()
                if lib.llama_pi_get_layer_stats(self.model, il, ctypes.byref(st)) != 0:
                    return []
                out.append(LayerStats(il, int(st.n_tokens), n_ff, int(st.n_predicted), int(st.n_fired),
                                      int(st.cpu_bytes), int(st.cpu_ns), int(st.cpu_threads),
                                      int(st.cpu_evals_tiles), int(st.cpu_union)))
            return out

        def placement(self) -> list[LayerPlacement]:
            """Per layer: FFN rows in GPU memory, whether attention is on the GPU, whether the FFN
            is split. Empty for a file without our layout."""
            return _placement_of(self.model)

        def close(self) -> None:
            if hasattr(self, "_stack"):  # a failed __init__ never reached upstream's set-up
                super().close()

        def reset_sparse_stats(self) -> None:
            llama_cpp.llama_cpp._lib.llama_pi_reset_stats(self.model)

        def _n_layer(self) -> int:
            return int(llama_cpp.llama_model_n_layer(self.model))

        def _n_ff(self) -> int:
            arch = self.metadata.get("general.architecture", "llama")
            return int(self.metadata.get(f"{arch}.feed_forward_length", 0))

    Llama.__module__ = "powerinfer_gguf"
    return Llama
