// powerinfer_gguf: the FFN of a llama-family graph: dense with the file's activation, or, for a
// file of our layout, predictor + sparse op per part of the layer (hot rows, cold rows), added.
#include "llama-powerinfer-impl.h"

#include "llama-model.h"

#include "ggml-powerinfer.h"
#include "ggml-backend.h"

#include <algorithm>
#include <vector>

// Down projection of h [n_ff, T] with the weight stored one row per neuron: [n_embd, T]. The dense
// path (prompts above sparse_max_tokens, and the sparse=false reference) transposes the weight
// into a scratch copy and runs mul_mat, which reaches the GEMM kernels: one extra pass over the
// down weight per ubatch, far cheaper than ggml_out_prod over down_t (docs/NOTES.md).
static ggml_tensor * pi_down_neuron_rows(ggml_context * ctx0, ggml_tensor * down_t, ggml_tensor * h) {
    if (ggml_is_quantized(down_t->type)) {
        // quantized blocks run along a row: a transposed view cannot be copied block-wise, so
        // dequantize first (the dense path of a quantized file: prompts above sparse_max_tokens)
        down_t = ggml_cast(ctx0, down_t, GGML_TYPE_F32);
    }
    return ggml_mul_mat(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, down_t)), h);
}

// Ubatches up to this many tokens run the sparse op where the rows are in GPU memory; larger ones
// run those rows densely (GEMMs at ~3 TB/s of weights beat per-token row gathers there).
static constexpr int64_t PI_GPU_SPARSE_MAX_TOKENS = 8;

// One part of a layer's FFN: rows [r0, r0 + n) of the hot-to-cold neuron order, all in one memory.
struct pi_ffn_part {
    ggml_tensor * gate;
    ggml_tensor * up;
    ggml_tensor * down_t;
    ggml_tensor * threshold;
    int64_t       r0;
};

static bool pi_in_gpu_memory(const ggml_tensor * w) {
    return w->buffer != nullptr && !ggml_backend_buffer_is_host(w->buffer);
}

// Dense FFN over one part: relu(gate x) * up x (dReLU: both rectified), then the row-per-neuron down.
static ggml_tensor * pi_build_dense_part(const llm_graph_context & g, ggml_tensor * cur, const pi_ffn_part & p,
                                         const llama_layer & layer, int il) {
    ggml_context * ctx0 = g.ctx0;
    const bool whole = layer.pi.ffn_gate_cold == nullptr; // lora scales apply to whole tensors only
    ggml_tensor * up   = g.build_lora_mm(p.up,   cur, whole ? layer.ffn_up_s   : nullptr);
    ggml_tensor * gate = g.build_lora_mm(p.gate, cur, whole ? layer.ffn_gate_s : nullptr);
    if (g.hparams.pi.ffn_act == LLAMA_PI_ACT_DRELU) {
        up = ggml_relu(ctx0, up);
    }
    ggml_tensor * h = ggml_mul(ctx0, ggml_relu(ctx0, gate), up);
    g.cb(h, "ffn_pi_h", il);
    return pi_down_neuron_rows(ctx0, p.down_t, h);
}

// The FFN of a sparse file. The predictor, score = fc2 . act(fc1 . x), runs once where the layer
// runs; each part then reads only rows with score > threshold (ggml_pi_sparse_ffn), or all of its
// rows densely (large ubatches, sparse = false). With all_active every row is computed, predictor
// skipped. A split layer has a hot part (GPU) and a cold part (CPU); their sums are added.
static ggml_tensor * pi_build_sparse_file_ffn(const llm_graph_context & g, ggml_tensor * cur, const llama_layer & layer, int il) {
    ggml_context * ctx0 = g.ctx0;
    const llama_hparams & hp = g.hparams;
    const int64_t n_tokens = cur->ne[1];
    std::vector<pi_ffn_part> parts = { { layer.ffn_gate, layer.ffn_up, layer.pi.ffn_down_t, layer.pi.pred_threshold, 0 } };
    if (layer.pi.ffn_gate_cold) {
        parts.push_back({ layer.pi.ffn_gate_cold, layer.pi.ffn_up_cold, layer.pi.ffn_down_t_cold,
                          layer.pi.pred_threshold_cold, layer.ffn_gate->ne[1] });
    }
    auto sparse_part = [&](const pi_ffn_part & p) {
        return hp.pi.rt_sparse && n_tokens <= (int64_t) hp.pi.rt_max_tokens &&
               (!pi_in_gpu_memory(p.gate) || n_tokens <= PI_GPU_SPARSE_MAX_TOKENS);
    };
    ggml_tensor * score = nullptr;
    const bool any_sparse = std::any_of(parts.begin(), parts.end(), sparse_part);
    if (any_sparse && !hp.pi.rt_all_active) {
        ggml_tensor * z = ggml_mul_mat(ctx0, layer.pi.pred_fc1, cur);
        if (hp.pi.pred_relu) {
            z = ggml_relu(ctx0, z);
        }
        score = ggml_mul_mat(ctx0, layer.pi.pred_fc2, z);
        g.cb(score, "ffn_pi_score", il);
    }
    const ggml_pi_act act = hp.pi.ffn_act == LLAMA_PI_ACT_DRELU ? GGML_PI_ACT_DRELU : GGML_PI_ACT_RELU;
    ggml_tensor * out = nullptr;
    for (const pi_ffn_part & p : parts) {
        ggml_tensor * part_out;
        if (sparse_part(p)) {
            const int64_t n_rows = p.gate->ne[1];
            ggml_tensor * part_score = score == nullptr ? nullptr :
                (parts.size() == 1 ? score : ggml_view_2d(ctx0, score, n_rows, n_tokens, score->nb[1], p.r0 * sizeof(float)));
            part_out = ggml_pi_sparse_ffn(ctx0, cur, p.gate, p.up, p.down_t, part_score,
                                          score ? p.threshold : nullptr, act,
                                          hp.pi.rt_all_active ? GGML_PI_SPARSE_ALL_ACTIVE : 0,
                                          p.r0 == 0 ? &layer.pi.stats : &layer.pi.stats_cold);
            g.cb(part_out, "ffn_pi_sparse", il);
        } else {
            part_out = pi_build_dense_part(g, cur, p, layer, il);
        }
        out = out ? ggml_add(ctx0, out, part_out) : part_out;
    }
    return out;
}

ggml_tensor * llama_pi_build_ffn(const llm_graph_context & g, ggml_tensor * cur, const llama_layer & layer, int il) {
    if (layer.pi.ffn_down_t) {
        return pi_build_sparse_file_ffn(g, cur, layer, il);
    }
    if (g.hparams.pi.ffn_act != LLAMA_PI_ACT_DRELU) {
        const llm_ffn_op_type op = g.hparams.pi.ffn_act == LLAMA_PI_ACT_RELU ? LLM_FFN_RELU : LLM_FFN_SILU;
        return g.build_ffn(cur,
                layer.ffn_up,   layer.ffn_up_b,   layer.ffn_up_s,
                layer.ffn_gate, layer.ffn_gate_b, layer.ffn_gate_s,
                layer.ffn_down, layer.ffn_down_b, layer.ffn_down_s,
                NULL, op, LLM_FFN_PAR, il);
    }
    // dReLU: both branches rectified, which build_ffn has no op for.
    ggml_context * ctx0 = g.ctx0;
    ggml_tensor * up = g.build_lora_mm(layer.ffn_up, cur, layer.ffn_up_s);
    if (layer.ffn_up_b) {
        up = ggml_add(ctx0, up, layer.ffn_up_b);
    }
    ggml_tensor * gate = g.build_lora_mm(layer.ffn_gate, cur, layer.ffn_gate_s);
    if (layer.ffn_gate_b) {
        gate = ggml_add(ctx0, gate, layer.ffn_gate_b);
    }
    cur = ggml_mul(ctx0, ggml_relu(ctx0, gate), ggml_relu(ctx0, up));
    g.cb(cur, "ffn_drelu", il);
    cur = g.build_lora_mm(layer.ffn_down, cur, layer.ffn_down_s);
    if (layer.ffn_down_b) {
        cur = ggml_add(ctx0, cur, layer.ffn_down_b);
    }
    return cur;
}
