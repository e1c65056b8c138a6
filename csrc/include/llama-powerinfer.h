// powerinfer_gguf additions to the llama.cpp C API.
//
// Everything powerinfer_gguf adds to llama.cpp's public surface is declared here,
// so that llama.h stays as upstream has it and a re-apply on a newer llama.cpp touches one file.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // Version of the API declared in this header; bumped when a function is added or changed.
    #define LLAMA_PI_API_VERSION 7

    LLAMA_API int32_t llama_pi_api_version(void);

    // Hash of the sources and hooks this library was built from (powerinfer_gguf.build.patches_hash():
    // csrc/ and patches/), so that Python can check it loaded the library its checkout describes.
    LLAMA_API const char * llama_pi_patch_series(void);

    // 0: the model has no sparse layout (runs as stock); 1: its decode FFN runs sparse;
    // 2: sparse layout, dense FFN (powerinfer.runtime.sparse = false).
    LLAMA_API int32_t llama_pi_model_sparse(const struct llama_model * model);

    // What the sparse FFN of one layer did since load (or the last reset), summed over tokens.
    struct llama_pi_layer_stats {
        int64_t n_evals;     // graph evaluations that ran the layer's sparse FFN
        int64_t n_tokens;    // tokens through it
        int64_t n_rows;      // neurons offered (n_ff x tokens)
        int64_t n_predicted; // neurons predicted active: rows read
        int64_t n_fired;     // of those, neurons with a non-zero activation
        // the CPU kernel's profile (v4); rows on the GPU are not counted here
        int64_t cpu_bytes;   // bytes of FFN rows the CPU read
        int64_t cpu_ns;      // wall time in the CPU kernel
        int64_t cpu_threads; // threads of its last evaluation (0: never ran on the CPU)
        int64_t cpu_evals_tiles; // CPU evaluations that took the tiles way (v6; the others: pairs)
        int64_t cpu_union;       // rows any token of a ubatch selected, summed over CPU evaluations (v6)
    };

    // 0 and *out filled; -1 when the model has no sparse layout or il is out of range.
    LLAMA_API int32_t llama_pi_get_layer_stats(const struct llama_model * model, int32_t il,
                                               struct llama_pi_layer_stats * out);

    // Zero every layer's counters (shared by all contexts of the model).
    LLAMA_API void llama_pi_reset_stats(const struct llama_model * model);

    // Where layer il's weights live after load (powerinfer.runtime.vram_budget). With
    // llama_model_params.no_alloc the model is planned and not loaded: the placement is the plan.
    struct llama_pi_layer_placement {
        int32_t n_rows;   // FFN neurons of the layer
        int32_t gpu_rows; // of those, rows held in a GPU's memory (the hottest; the rest in CPU memory)
        int32_t attn_gpu; // 1 when the layer's attention (and KV cache) is on a GPU
        int32_t split;    // 1 when the FFN is two parts: rows [0, h) and [h, n_rows)
        int32_t dev_rows; // h: rows planned with the layer on its device (n_rows when not split)
        char    device[32]; // the device holding its attention: "CPU" (this host's), "CUDA0", "RPC1", ... (v7)
    };

    // 0 and *out filled; -1 when the model has no sparse layout or il is out of range.
    LLAMA_API int32_t llama_pi_get_layer_placement(const struct llama_model * model, int32_t il,
                                                   struct llama_pi_layer_placement * out);

    // The placement planner, a pure function (src/llama-powerinfer-plan.cpp): what each layer
    // costs in, where its rows go out. The loader calls it with what it reads from the file.
    struct llama_pi_plan_layer {
        uint64_t      base_bytes; // read whole every token where the layer runs: attention, norms, predictor, KV
        uint64_t      row_bytes;  // one FFN row: gate + up + down_t
        int32_t       n_rows;     // FFN neurons
        int32_t       gpu_rows;   // 1: the GPU kernels read this layer's row type
        const float * freq;       // n_rows firing frequencies, hot to cold
    };

    struct llama_pi_plan_params {
        uint64_t output_bytes;     // output layer and norm: offloaded first (llama.cpp's order)
        int64_t  avail_bytes;      // the VRAM budget less the compute reserve
        int32_t  n_gpu_layers_cap; // at most this many GPU layers as llama.cpp counts them (-1: no cap)
        int64_t  split_cost_us;    // a split layer's hand-off per token, worth that long of CPU reads
    };

    // Fills dev_rows[il] (rows with layer il on its device: n_rows for CPU layers) and returns
    // n_gpu_layers as llama.cpp counts them (output = 1, then layers from the last), -1 when
    // avail_bytes cannot hold the output layer, -2 for a negative n_rows or a missing freq.
    LLAMA_API int32_t llama_pi_plan(const struct llama_pi_plan_layer * layers, int32_t n_layer,
                                    struct llama_pi_plan_params params, int32_t * dev_rows);

    // The budget "auto" stands for: the first GPU's free memory less 512 MiB and 2% of its total;
    // -1 without a GPU. pi-bench and Llama(vram_budget="auto") both ask here.
    LLAMA_API int64_t llama_pi_auto_vram_budget(void);

#ifdef __cplusplus
}
#endif
