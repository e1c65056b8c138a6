// powerinfer_gguf: placement under a VRAM budget, the loader's side: what the file says each
// layer costs (llama_pi_plan_layer), the budget from the run-time keys and the GPU, the planner's
// answer (llama-powerinfer-plan.cpp) in hparams.pi.dev_rows, logged; then each split layer's row
// tensors are split in the loader's view of the file.
#include "llama-powerinfer.h"
#include "llama-powerinfer-impl.h"

#include "llama-impl.h"
#include "llama-model.h"
#include "llama-model-loader.h"

#include "ggml-backend.h"
#include "ggml-powerinfer.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

static std::string pi_gib(double bytes) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
    return buf;
}

static size_t pi_bytes_of(const llama_model_loader & ml, const std::string & name) {
    const ggml_tensor * t = ml.get_tensor_meta(name.c_str());
    return t ? ggml_nbytes(t) : 0;
}

// Whether the GPU's sparse op reads a layer's rows (their types), asked of the device with the op
// built over them: its supports_op is the one list. Rows it cannot read stay in CPU memory. No
// GPU (a plan made without one): the plan a GPU that reads them would get.
static bool pi_gpu_reads_rows(ggml_backend_dev_t gpu, const ggml_tensor * gate, const ggml_tensor * down_t) {
    if (gpu == nullptr || gate == nullptr || down_t == nullptr) {
        return true;
    }
    llama_pi_probe_ctx probe;
    const int64_t n_embd = gate->ne[0], n_rows = gate->ne[1];
    auto rows = [&](ggml_type t) { return ggml_new_tensor_2d(probe.ctx, t, n_embd, n_rows); };
    ggml_tensor * op = ggml_pi_sparse_ffn(probe.ctx, ggml_new_tensor_2d(probe.ctx, GGML_TYPE_F32, n_embd, 1),
        rows(gate->type), rows(gate->type), rows(down_t->type), ggml_new_tensor_2d(probe.ctx, GGML_TYPE_F32, n_rows, 1),
        ggml_new_tensor_1d(probe.ctx, GGML_TYPE_F32, n_rows), GGML_PI_ACT_RELU, 0, nullptr);
    return ggml_backend_dev_supports_op(gpu, op);
}

int64_t llama_pi_auto_budget(size_t free, size_t total) {
    return (int64_t) free - ((512ll << 20) + (int64_t) (total / 50));
}

int64_t llama_pi_auto_vram_budget(void) {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU) {
            size_t free = 0, total = 0;
            ggml_backend_dev_memory(d, &free, &total);
            return std::max<int64_t>(0, llama_pi_auto_budget(free, total));
        }
    }
    return -1;
}

void llama_pi_split_weight(llama_model_loader & ml, const std::string & name, const std::string & cold_name, int64_t rows) {
    auto it = ml.weights_map.find(name);
    if (it == ml.weights_map.end()) {
        throw std::runtime_error("powerinfer: tensor " + name + " is missing");
    }
    if (ml.weights_map.count(cold_name)) {
        throw std::runtime_error("powerinfer: the file already has a tensor named " + cold_name);
    }
    const ggml_tensor * full = it->second.tensor;
    const int d = ggml_n_dims(full) - 1;
    GGML_ASSERT(rows > 0 && rows < full->ne[d]);
    if (ml.contexts.empty() || ml.pi_split_ctx == nullptr) {
        ggml_init_params params = { ggml_tensor_overhead() * (size_t) (8 * LLAMA_MAX_LAYERS), nullptr, true };
        ml.contexts.emplace_back(ggml_init(params));
        ml.pi_split_ctx = ml.contexts.back().get();
    }
    auto part = [&](const std::string & part_name, int64_t n) {
        ggml_tensor * t = ggml_dup_tensor(ml.pi_split_ctx, full);
        t->ne[d] = n;
        for (int i = d + 1; i < GGML_MAX_DIMS; ++i) {
            t->nb[i] = t->nb[i - 1] * t->ne[i - 1];
        }
        ggml_set_name(t, part_name.c_str());
        return t;
    };
    llama_model_loader::llama_tensor_weight hot  = it->second;
    llama_model_loader::llama_tensor_weight cold = it->second;
    hot.tensor  = part(name, rows);
    cold.tensor = part(cold_name, full->ne[d] - rows);
    cold.offs  += (size_t) rows * full->nb[d];
    it->second = hot;
    ml.weights_map.emplace(cold_name, cold);
    ml.n_tensors++;
}

// The budget in bytes from powerinfer.runtime.vram_budget (-1: auto) and the GPU; errors by name.
static int64_t pi_budget_bytes(const llama_model_loader & ml, ggml_backend_dev_t gpu, int64_t budget_in) {
    if (budget_in < -1) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_BUDGET " = " + std::to_string(budget_in) +
                                 " (give bytes >= 0, or -1 for auto)");
    }
    if (gpu == nullptr && !llama_pi_runtime_bool(ml, LLAMA_PI_KEY_RT_PLAN_NO_GPU, false)) {
        throw std::runtime_error("powerinfer: a VRAM budget was given but llama.cpp has no GPU device "
                                 "(a CPU-only build, or no GPU found); use a budget of 0");
    }
    // (plan_without_gpu, tests: the plan is made and logged; with no GPU every part stays on the CPU)
    size_t free = 0, total = 0;
    if (gpu != nullptr) {
        ggml_backend_dev_memory(gpu, &free, &total);
    } else if (budget_in == -1) {
        throw std::runtime_error("powerinfer: vram_budget auto needs a GPU");
    }
    if (budget_in == -1) {
        const int64_t budget = llama_pi_auto_budget(free, total);
        if (budget <= 0) {
            throw std::runtime_error("powerinfer: vram_budget auto: the GPU has only " + pi_gib((double) free) + " free");
        }
        return budget;
    }
    if (total > 0 && (size_t) budget_in > total) {
        throw std::runtime_error("powerinfer: vram_budget " + pi_gib((double) budget_in) + " exceeds the GPU's " +
                                 pi_gib((double) total));
    }
    return budget_in;
}

// What each layer reads whole (weights other than FFN rows, plus its KV cache for n_ctx tokens),
// one FFN row's bytes and whether the GPU reads its rows; frequencies read into freq[il].
static std::vector<llama_pi_plan_layer> pi_layer_costs(const llama_model_base & model, llama_model_loader & ml, int64_t n_ctx,
                                                       ggml_backend_dev_t gpu, std::vector<std::vector<float>> & freq) {
    const llama_hparams & hp = model.hparams;
    const int n_layer = (int) hp.n_layer();
    std::vector<llama_pi_plan_layer> cost(n_layer);
    for (int il = 0; il < n_layer; ++il) {
        cost[il] = { 0, 0, (int32_t) hp.n_ff(il), 0, nullptr };
    }
    for (auto & w : ml.weights_map) {
        int il = -1;
        char rest[160] = {0};
        if (sscanf(w.first.c_str(), "blk.%d.%159s", &il, rest) != 2 || il < 0 || il >= n_layer) {
            continue;
        }
        const std::string r = rest;
        if (r == "ffn_gate.weight" || r == "ffn_up.weight" || r == "ffn_down_t.weight") {
            cost[il].row_bytes += ggml_row_size(w.second.tensor->type, w.second.tensor->ne[0]);
            if (r == "ffn_gate.weight") {
                const std::string down = "blk." + std::to_string(il) + ".ffn_down_t.weight";
                cost[il].gpu_rows = pi_gpu_reads_rows(gpu, w.second.tensor, ml.get_tensor_meta(down.c_str()));
            }
        } else {
            cost[il].base_bytes += ggml_nbytes(w.second.tensor);
        }
    }
    const LLM_TN tn(model.arch);
    freq.assign(n_layer, {});
    for (int il = 0; il < n_layer; ++il) {
        cost[il].base_bytes += (size_t) n_ctx * (hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il)) * sizeof(ggml_fp16_t);
        const std::string fname = tn(LLM_TENSOR_PI_NEURON_FREQ, nullptr, il);
        const auto * w = ml.get_weight(fname.c_str());
        const int64_t n_ff = hp.n_ff(il);
        if (w == nullptr || w->tensor->type != GGML_TYPE_F32 || ggml_nelements(w->tensor) != n_ff) {
            throw std::runtime_error("powerinfer: tensor " + fname + " is missing or not F32 [" + std::to_string(n_ff) + "]");
        }
        // straight from the file: the mappings are made after this plan
        freq[il].resize(n_ff);
        const auto & file = ml.files.at(w->idx);
        file->seek(w->offs, SEEK_SET);
        file->read_raw(freq[il].data(), n_ff * sizeof(float));
        cost[il].freq = freq[il].data();
    }
    return cost;
}

// The staging of a large ubatch's dense FFN on the GPU: a chunk of rows in CPU memory brought over
// (gate, up, down; a quantized down then dequantized to F32, both alive at once) and, where the
// GPU's out_prod does not read that down (llama-powerinfer-graph.cpp), its transposed copy.
static int64_t pi_staging_bytes(const llama_model_loader & ml, ggml_backend_dev_t gpu, int64_t n_ff_max, int64_t n_ff0) {
    const int64_t rows = std::min(n_ff_max, LLAMA_PI_GPU_CHUNK_ROWS);
    const int64_t row_b = (int64_t) pi_bytes_of(ml, "blk.0.ffn_gate.weight") / n_ff0;
    const ggml_tensor * down = ml.get_tensor_meta("blk.0.ffn_down_t.weight");
    const bool quantized = down != nullptr && ggml_is_quantized(down->type);
    const ggml_type down_type = down == nullptr ? GGML_TYPE_F16 : quantized ? GGML_TYPE_F32 : down->type;
    const int64_t down_b = quantized ? (int64_t) (down->ne[0] * sizeof(float)) : row_b; // the down's rows as multiplied
    llama_pi_probe_ctx probe;
    ggml_tensor * w = ggml_new_tensor_2d(probe.ctx, down_type, down_b / ggml_type_size(down_type), rows);
    ggml_tensor * h = ggml_new_tensor_2d(probe.ctx, GGML_TYPE_F32, rows, 512);
    const bool out_prod = ggml_backend_dev_supports_op(gpu, ggml_out_prod(probe.ctx, w, ggml_transpose(probe.ctx, h)));
    return rows * (3 * row_b + (quantized ? down_b : 0) + (out_prod ? 0 : down_b));
}

// Compute buffers of a prompt ubatch (n_ub tokens) on the GPU. llama.cpp's allocator reuses memory
// from one part of the graph to the next, so its buffer is the largest part, not their sum (the
// sum held back 2.4x what was allocated: docs/NOTES.md): attention (scores and their softmax), the
// FFN (score, its difference from the threshold and the mask over every row; gate, up and h of a
// chunk; the chunk's staging) or the output (logits of every token), all F32, with the residual
// stream alive throughout; plus 64 MiB for the backend's own pool (activations converted for its
// GEMMs) and workspace.
static int64_t pi_compute_reserve(const llama_model_base & model, const llama_model_loader & ml, int64_t n_ctx,
                                  ggml_backend_dev_t gpu) {
    const llama_hparams & hp = model.hparams;
    int64_t n_head_max = 0, n_ff_max = 0;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        n_head_max = std::max<int64_t>(n_head_max, hp.n_head(il));
        n_ff_max   = std::max<int64_t>(n_ff_max, hp.n_ff(il));
    }
    const int64_t n_ub = std::min<int64_t>(512, n_ctx);
    const int64_t n_embd = hp.n_embd;
    const int64_t attention = n_ub * 4 * (2 * n_head_max * n_ctx + 4 * n_embd);
    const int64_t ffn = (gpu ? pi_staging_bytes(ml, gpu, n_ff_max, hp.n_ff(0)) : 0) +
                        n_ub * 4 * (3 * n_ff_max + 3 * std::min(n_ff_max, LLAMA_PI_GPU_CHUNK_ROWS));
    const int64_t output = n_ub * 4 * ((int64_t) model.vocab.n_tokens() + n_embd);
    const int64_t reserve = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_VRAM_RESERVE,
        (64ll << 20) + n_ub * 4 * 2 * n_embd + std::max({ attention, ffn, output }));
    if (reserve < 0) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_RESERVE " must be >= 0");
    }
    return reserve;
}

static void pi_log_plan(const llama_pi_plan_result & res, int64_t budget, bool is_auto, int n_layer, int64_t n_ctx,
                        int64_t reserve, const llama_hparams & hp) {
    LLAMA_LOG_INFO("%s: powerinfer: VRAM budget %s%s: %d of %d layers on the GPU (attention, predictor, KV for %" PRId64
                   " tokens)%s, %s; hot FFN rows %s (%.1f%% of the offloaded layers' activation mass); compute reserve %s\n",
                   __func__, pi_gib((double) budget).c_str(), is_auto ? " (auto)" : "",
                   res.n_layers_gpu, n_layer, n_ctx, res.n_gpu_layers >= 1 ? " + output" : "", pi_gib((double) res.fixed_bytes).c_str(),
                   pi_gib((double) res.rows_bytes).c_str(), 100.0 * res.mass_share, pi_gib((double) reserve).c_str());
    std::string line;
    for (int il = n_layer - res.n_layers_gpu; il < n_layer; ++il) {
        line += std::to_string(il) + ":" + std::to_string(hp.pi.dev_rows[il]) + (il + 1 < n_layer ? " " : "");
    }
    LLAMA_LOG_INFO("%s: powerinfer: GPU rows per layer (of %u) %s\n", __func__, hp.n_ff(0), line.c_str());
}

// Plans a budget: fills hparams.pi.dev_rows, returns n_gpu_layers.
static int pi_plan_budget(llama_model_base & model, llama_model_loader & ml, int n_gpu_layers, int64_t budget_in) {
    llama_hparams & hp = model.hparams;
    const int n_layer = (int) hp.n_layer();
    ggml_backend_dev_t gpu = nullptr;
    for (const auto & d : model.devices) {
        if (!d.is_meta && ggml_backend_dev_type(d.dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            gpu = d.dev;
            break;
        }
    }
    const int64_t budget = pi_budget_bytes(ml, gpu, budget_in);
    const int64_t n_ctx = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_VRAM_CTX, std::max<int64_t>(1, std::min<int64_t>(4096, hp.n_ctx_train)));
    if (n_ctx < 1 || n_ctx > (1 << 24)) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_CTX " = " + std::to_string(n_ctx) + " is outside 1..16777216");
    }
    const int64_t split_us = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_SPLIT_COST_US, 70);
    if (split_us < 0 || split_us > 1000000) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_SPLIT_COST_US " = " + std::to_string(split_us) + " is outside 0..1000000");
    }
    std::vector<std::vector<float>> freq;
    const std::vector<llama_pi_plan_layer> cost = pi_layer_costs(model, ml, n_ctx, gpu, freq);
    const int64_t reserve = pi_compute_reserve(model, ml, n_ctx, gpu);
    size_t out_bytes = pi_bytes_of(ml, "output_norm.weight");
    out_bytes += ml.get_tensor_meta("output.weight") ? pi_bytes_of(ml, "output.weight") : pi_bytes_of(ml, "token_embd.weight");

    const llama_pi_plan_params params = { out_bytes, budget - reserve, n_gpu_layers, split_us };
    const llama_pi_plan_result res = llama_pi_plan_layers(cost.data(), n_layer, params);
    if (res.n_gpu_layers < 0) {
        throw std::runtime_error("powerinfer: vram_budget " + pi_gib((double) budget) + " cannot hold the output layer (" +
                                 pi_gib((double) out_bytes) + ") plus " + pi_gib((double) reserve) +
                                 " of compute buffers: give at least " + pi_gib((double) (reserve + out_bytes + cost[n_layer - 1].base_bytes)) +
                                 ", or 0 for CPU-only");
    }
    for (int il = 0; il < n_layer; ++il) {
        hp.pi.dev_rows[il] = (uint32_t) res.dev_rows[il];
    }
    hp.pi.placed = true;
    pi_log_plan(res, budget, budget_in == -1, n_layer, n_ctx, reserve, hp);
    return res.n_gpu_layers;
}

// Splits the loader's view of each split layer's row tensors, before create_tensor sizes its
// contexts by the tensor count. The whole tensors' shapes are checked first, so each part's is right
// by construction and a bad file fails naming the file's tensor.
static void pi_split_layers(const llama_model_base & model, llama_model_loader & ml) {
    const llama_hparams & hp = model.hparams;
    const LLM_TN tn(model.arch);
    const int64_t n_embd = hp.n_embd;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        const int64_t n_ff = hp.n_ff(il);
        const int64_t h = hp.pi.dev_rows[il];
        if (h == 0 || h == n_ff) {
            continue;
        }
        const std::pair<std::string, std::vector<int64_t>> rows[] = {
            { tn(LLM_TENSOR_FFN_GATE, "weight", il),       { n_embd, n_ff } },
            { tn(LLM_TENSOR_FFN_UP, "weight", il),         { n_embd, n_ff } },
            { tn(LLM_TENSOR_PI_FFN_DOWN_T, "weight", il),  { n_embd, n_ff } },
            { tn(LLM_TENSOR_PI_PRED_THRESHOLD, nullptr, il), { n_ff } },
        };
        for (const auto & r : rows) {
            ml.check_tensor_dims(r.first, r.second, true, false);
            llama_pi_split_weight(ml, r.first, r.first + ".cold", h);
        }
    }
}

int llama_pi_plan_placement(llama_model_base & model, llama_model_loader & ml, int n_gpu_layers) {
    llama_hparams & hp = model.hparams;
    const int n_layer = (int) hp.n_layer();
    for (int il = 0; il < n_layer; ++il) {
        hp.pi.dev_rows[il] = hp.n_ff(il);
    }
    hp.pi.placed = false;
    if (!hp.pi.sparse) {
        return n_gpu_layers;
    }
    const int64_t budget_in = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_VRAM_BUDGET, INT64_MIN);
    const int64_t forced    = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_DEV_ROWS, -1);
    int ngl = n_gpu_layers;
    if (budget_in == 0) {
        ngl = 0;
    } else if (budget_in != INT64_MIN) {
        ngl = pi_plan_budget(model, ml, n_gpu_layers, budget_in);
    }
    if (forced >= 0) {
        // tests: the same split in every layer, whatever the devices (both parts on the CPU without a GPU)
        if (hp.pi.placed) {
            LLAMA_LOG_WARN("%s: powerinfer: " LLAMA_PI_KEY_RT_DEV_ROWS " = %" PRId64 " replaces the planned rows: "
                           "the GPU may now hold more than the budget\n", __func__, forced);
        }
        for (int il = 0; il < n_layer; ++il) {
            hp.pi.dev_rows[il] = (uint32_t) std::min<int64_t>(forced, hp.n_ff(il));
        }
        hp.pi.placed = true;
    }
    if (hp.pi.placed) {
        pi_split_layers(model, ml);
    }
    return ngl;
}

