// powerinfer_gguf: our fields in llama.cpp's structs, gathered in one member each
// (llama_hparams::pi, llama_layer::pi), so an upstream struct gains one line.
#pragma once

#include "ggml-cpp.h"
#include "ggml-powerinfer.h"

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

struct ggml_tensor;

// The memory of a layer's counters: a context and a buffer per part (freed with the model)
struct llama_pi_counter_store {
    ggml_context_ptr ctx;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

// What the file says (powerinfer.* keys), the run-time choices (powerinfer.runtime.* kv overrides)
// and the placement the planner made. Included by llama-hparams.h after LLAMA_MAX_LAYERS.
struct llama_pi_hparams {
    uint32_t ffn_act   = 0;     // enum llama_pi_act, from `<arch>.hidden_activation`; 0 = SiLU (upstream)
    bool     sparse    = false; // the file carries our sparse layout
    bool     pred_relu = false; // the predictor has a ReLU between its matrices (PowerInfer's form)

    bool     rt_sparse      = true;      // false: dense FFN over our layout
    bool     rt_all_active  = false;     // true: every neuron computed on the sparse path
    uint32_t rt_way         = 0;         // enum llama_pi_way: how each part of the FFN runs (0: chosen per ubatch)

    // per layer, rows the predictor selects per row that fires (its held-out recall / precision;
    // 1 where the file does not say): a row's firing frequency times this is how often it is read
    std::array<float, LLAMA_MAX_LAYERS> select_per_fire = {};

    // placement: layer il keeps its dev rows [0, dev_rows[il]) on its own device (a GPU layer: its
    // hot rows) and its cold rows [dev_rows[il], n_ff) in CPU memory. Without a plan: n_ff (whole).
    bool placed = false;
    std::array<uint32_t, LLAMA_MAX_LAYERS> dev_rows = {};
    // with budgets over several devices (split_devices): the layers each of llama.cpp's devices
    // takes, as its tensor_split (llama_max_devices() long; the output layer counts one)
    bool split_devices = false;
    std::array<float, 16> dev_split = {};
};

// A layer's tensors of our layout, and what its sparse FFN did.
struct llama_pi_layer {
    ggml_tensor * ffn_down_t     = nullptr; // down projection, one row per neuron
    ggml_tensor * pred_fc1       = nullptr;
    ggml_tensor * pred_fc2       = nullptr;
    ggml_tensor * pred_threshold = nullptr;
    ggml_tensor * neuron_freq    = nullptr;
    // the cold part of a split FFN (rows [dev_rows, n_ff) in CPU memory); null when not split
    ggml_tensor * ffn_gate_cold       = nullptr;
    ggml_tensor * ffn_up_cold         = nullptr;
    ggml_tensor * ffn_down_t_cold     = nullptr;
    ggml_tensor * pred_threshold_cold = nullptr;
    // the op's counters (I64 ggml_pi_sparse_stats; llama_pi_get_layer_stats): the hot part (or the
    // whole FFN), the cold part; each in a buffer of its part's rows' type (llama_pi_loaded)
    ggml_tensor * counters      = nullptr;
    ggml_tensor * counters_cold = nullptr;
    std::shared_ptr<llama_pi_counter_store> counter_store; // owns their context and buffers
    // per part (whole or hot, cold) and per chunk of LLAMA_PI_GPU_CHUNK_ROWS of its rows: the
    // fewest tokens of a ubatch expected to select most of the chunk's rows
    // (LLAMA_PI_GATHER_MAX_SHARE), from which the dense GPU way copies the chunk whole instead of
    // gathering it (INT32_MAX: never). Empty: always gather.
    std::array<std::vector<int32_t>, 2> copy_all_from;
};
