// powerinfer_gguf: the C API of include/llama-powerinfer.h (placement: llama-powerinfer-placement.cpp).
#include "llama-powerinfer.h"
#include "llama-powerinfer-impl.h"

#include "llama-model.h"
#include "llama-model-loader.h"

#include "gguf.h"
#include "ggml-powerinfer.h"
#include "ggml-backend.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef LLAMA_PI_PATCHES
#define LLAMA_PI_PATCHES "unknown"
#endif

int32_t llama_pi_api_version(void) {
    return LLAMA_PI_API_VERSION;
}

const char * llama_pi_patch_series(void) {
    return LLAMA_PI_PATCHES;
}

int32_t llama_pi_model_sparse(const struct llama_model * model) {
    const llama_hparams & hp = model->hparams;
    if (!hp.pi.sparse) {
        return 0;
    }
    return hp.pi.rt_sparse ? 1 : 2;
}

// A part's counters as its backend holds them (ggml_backend_tensor_get: host, GPU or RPC server)
static ggml_pi_sparse_stats pi_read_counters(const ggml_tensor * counters) {
    ggml_pi_sparse_stats st = {};
    if (counters != nullptr) {
        ggml_backend_tensor_get(counters, &st, 0, sizeof(st));
    }
    return st;
}

int32_t llama_pi_get_layer_stats(const struct llama_model * model, int32_t il, struct llama_pi_layer_stats * out) {
    if (!model->hparams.pi.sparse || il < 0 || il >= (int32_t) model->layers.size() || out == nullptr) {
        return -1;
    }
    // A split layer's parts count separately (the GPU kernels count nothing): tokens and
    // evaluations once, rows read and fired summed over the parts that count.
    const llama_layer & l = model->layers[il];
    const ggml_pi_sparse_stats a = pi_read_counters(l.pi.counters);
    const ggml_pi_sparse_stats b = pi_read_counters(l.pi.counters_cold);
    out->n_evals     = std::max(a.n_evals,  b.n_evals);
    out->n_tokens    = std::max(a.n_tokens, b.n_tokens);
    out->n_rows      = out->n_tokens * (int64_t) model->hparams.n_ff(il);
    out->n_predicted = a.n_predicted + b.n_predicted;
    out->n_fired     = a.n_fired     + b.n_fired;
    // rows the CPU read: a gate row per predicted neuron, an up row per firing gate, a down row
    // per non-zero activation (both parts have the layer's row sizes: they are views of its rows)
    out->cpu_bytes   = out->n_predicted * (int64_t) l.ffn_gate->nb[1] + (a.n_up + b.n_up) * (int64_t) l.ffn_up->nb[1] +
                       out->n_fired * (int64_t) l.pi.ffn_down_t->nb[1];
    out->cpu_ns      = a.ns + b.ns;
    out->cpu_threads = std::max(a.n_threads, b.n_threads);
    out->cpu_evals_tiles = a.n_evals_tiles + b.n_evals_tiles;
    out->cpu_union       = a.n_union       + b.n_union;
    return 0;
}

void llama_pi_reset_stats(const struct llama_model * model) {
    for (const llama_layer & layer : model->layers) {
        for (ggml_tensor * t : { layer.pi.counters, layer.pi.counters_cold }) {
            if (t != nullptr) {
                ggml_backend_tensor_memset(t, 0, 0, ggml_nbytes(t));
            }
        }
    }
}

int32_t llama_pi_get_layer_placement(const struct llama_model * model, int32_t il, struct llama_pi_layer_placement * out) {
    if (!model->hparams.pi.sparse || il < 0 || il >= (int32_t) model->layers.size() || out == nullptr) {
        return -1;
    }
    const llama_layer & l = model->layers[il];
    auto device = [](const ggml_tensor * t) -> ggml_backend_dev_t {
        return t && t->buffer && !ggml_backend_buffer_is_host(t->buffer) ?
            ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer)) : nullptr;
    };
    auto on_gpu = [&](const ggml_tensor * t) {
        ggml_backend_dev_t dev = device(t);
        return dev != nullptr && llama_pi_dev_is_gpu(dev);
    };
    auto rows = [](const ggml_tensor * t) { return t ? t->ne[1] : 0; };
    out->n_rows    = (int32_t) model->hparams.n_ff(il);
    out->gpu_rows  = (int32_t) ((on_gpu(l.ffn_gate) ? rows(l.ffn_gate) : 0) + (on_gpu(l.pi.ffn_gate_cold) ? rows(l.pi.ffn_gate_cold) : 0));
    out->attn_gpu  = on_gpu(l.wo) ? 1 : 0;
    out->split     = l.pi.ffn_gate_cold != nullptr ? 1 : 0;
    out->dev_rows  = (int32_t) model->hparams.pi.dev_rows[il];
    snprintf(out->device, sizeof(out->device), "%s", device(l.wo) ? ggml_backend_dev_name(device(l.wo)) : "CPU");
    return 0;
}
