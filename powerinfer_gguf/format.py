"""The one place that names our GGUF keys and tensors (docs/FORMAT.md describes each).

Everything we add to a GGUF lives under the ``powerinfer.`` namespace, so a file without it is a
plain llama.cpp file and runs exactly as stock. The C++ patches declare the same strings.
"""
from __future__ import annotations

import gguf

FORMAT_VERSION = 1

NAMESPACE = "powerinfer"


class Keys:
    """GGUF metadata keys (``powerinfer.*``)."""

    FORMAT_VERSION = f"{NAMESPACE}.format_version"  # uint32, FORMAT_VERSION: the file is ours
    SPARSE = f"{NAMESPACE}.sparse"                  # bool: neurons ranked, predictors present
    FFN_DOWN_LAYOUT = f"{NAMESPACE}.ffn_down_layout"  # str: "neuron_rows" (blk.N.ffn_down_t)
    PREDICTOR_ACT = f"{NAMESPACE}.predictor.act"    # str: "none" (ours) or "relu" (PowerInfer's)
    PREDICTOR_RECALL_TARGET = f"{NAMESPACE}.predictor.recall_target"  # float32
    PREDICTOR_RECALL = f"{NAMESPACE}.predictor.recall"        # float32[n_layer], held-out
    PREDICTOR_PRECISION = f"{NAMESPACE}.predictor.precision"  # float32[n_layer], held-out
    CALIB_TOKENS = f"{NAMESPACE}.calib.tokens"      # uint32: tokens profiled
    STOCK_TWIN = f"{NAMESPACE}.stock_twin"          # str, only in a --stock twin: what it is

    class Runtime:
        """Run-time switches, given as kv overrides at load; a file may carry them too. Read by csrc/src/llama-powerinfer-load.cpp."""

        SPARSE = f"{NAMESPACE}.runtime.sparse"                    # bool, default true: sparse decode FFN
        ALL_ACTIVE = f"{NAMESPACE}.runtime.all_active"            # bool, default false: every neuron computed
        FFN_WAY = f"{NAMESPACE}.runtime.ffn_way"                  # str, one of FFN_WAYS, default "auto"
        # placement (csrc/src/llama-powerinfer-placement.cpp): never in files, only kv overrides
        VRAM_BUDGET = f"{NAMESPACE}.runtime.vram_budget"          # int bytes; -1 = auto; absent = -ngl as given
        VRAM_CTX = f"{NAMESPACE}.runtime.vram_ctx"                # int, tokens the KV reserve is sized for
        DEV_ROWS = f"{NAMESPACE}.runtime.dev_rows"                # int, tests: split every layer's FFN here
        VRAM_RESERVE = f"{NAMESPACE}.runtime.vram_reserve"        # int bytes for compute buffers (default: estimate)
        SPLIT_COST_US = f"{NAMESPACE}.runtime.split_cost_us"      # int, a split layer's hand-off cost (default 70)
        PLAN_WITHOUT_GPU = f"{NAMESPACE}.runtime.plan_without_gpu"  # bool, tests: plan a budget with no GPU
        DEVICE_BUDGETS = f"{NAMESPACE}.runtime.device_budgets"    # str "NAME=BYTES,...": a budget per device (-1 auto)

    class Synth:
        """Provenance of a synthetic model written by powerinfer_gguf.synth (see docs/FORMAT.md)."""

        PRESET = f"{NAMESPACE}.synth.preset"                      # str, e.g. "7b"
        SEED = f"{NAMESPACE}.synth.seed"                          # uint32
        FIRING_MEAN_TARGET = f"{NAMESPACE}.synth.firing_mean_target"  # float32, asked mean firing rate
        HOT_SHARE_TARGET = f"{NAMESPACE}.synth.hot_share_target"  # float32, share of neurons ...
        HOT_MASS_TARGET = f"{NAMESPACE}.synth.hot_mass_target"    # float32, ... that give this mass
        FIRING_MEAN = f"{NAMESPACE}.synth.firing_mean"            # float32, measured (held-out tokens)
        HOT_MASS = f"{NAMESPACE}.synth.hot_mass"                  # float32, measured mass of hot share
        GATE_RANK = f"{NAMESPACE}.synth.gate_rank"                # uint32, rank of the gate signal
        BIAS_CHANNEL = f"{NAMESPACE}.synth.bias_channel"          # uint32, the constant channel


# llama.cpp's own key for the FFN activation (src/llama-arch.cpp LLM_KV_HIDDEN_ACT), as gguf-py names it.
HIDDEN_ACT_KEY = gguf.Keys.LLM.HIDDEN_ACT

# Activations we know: the llama.cpp spelling of each, and whether the FFN is ReLU-sparse.
ACTIVATIONS = {
    "relu": "relu",    # ReGLU: relu(gate) * up (ReluLLaMA, ProSparse)
    "drelu": "drelu",  # dReLU: relu(gate) * relu(up) (TurboSparse)
    "silu": "silu",    # SwiGLU: dense
}

# How each part of a sparse FFN may run (Keys.Runtime.FFN_WAY; csrc enum llama_pi_way, same order).
FFN_WAYS = ("auto", "pairs", "tiles", "dense")


class Tensors:
    """Per-layer tensors we add (``.format(layer)``); shapes as numpy [rows, cols]."""

    FFN_DOWN_T = "blk.{}.ffn_down_t.weight"      # [n_ff, n_embd]: down projection, one row per neuron
    PRED_FC1 = "blk.{}.pi_pred_fc1.weight"       # [rank, n_embd]
    PRED_FC2 = "blk.{}.pi_pred_fc2.weight"       # [n_ff, rank]
    PRED_THRESHOLD = "blk.{}.pi_pred_threshold"  # [n_ff] F32: active where fc2 act(fc1 x) > this
    NEURON_FREQ = "blk.{}.pi_neuron_freq"        # [n_ff] F32: firing frequency, non-increasing

    @staticmethod
    def is_predictor(name: str) -> bool:
        """A predictor weight (fc1, fc2): what pi-quantize keeps at its own precision."""
        return ".pi_pred_fc" in name


def write_llama_kv(w, hp, name: str) -> None:
    """llama.cpp's own keys for a LLaMA-architecture model (a gguf.GGUFWriter; hp: forward.Hparams),
    the activation included: what both the converter and the synthetic generator write."""
    w.add_name(name)
    w.add_context_length(hp.n_ctx_train)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_vocab_size(hp.n_vocab)
    w.add_hidden_act(ACTIVATIONS[hp.act])


def field_item(field) -> tuple:
    """A gguf.ReaderField as (value, value type, array item type or None): what
    gguf.GGUFWriter.add_key_value takes, to copy a key from one file to another."""
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub
