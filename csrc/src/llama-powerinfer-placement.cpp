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
#include <cerrno>
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

enum ggml_backend_dev_type llama_pi_dev_kind(ggml_backend_dev_t dev) {
    using remote_type_fn = enum ggml_backend_dev_type (*)(ggml_backend_dev_t);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto remote = reg ? (remote_type_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_device_remote_type") : nullptr;
    return remote ? remote(dev) : ggml_backend_dev_type(dev);
}

bool llama_pi_dev_is_gpu(ggml_backend_dev_t dev) {
    const enum ggml_backend_dev_type kind = llama_pi_dev_kind(dev);
    return kind == GGML_BACKEND_DEVICE_TYPE_GPU || kind == GGML_BACKEND_DEVICE_TYPE_IGPU;
}

static bool pi_dev_is_remote(ggml_backend_dev_t dev) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    return reg && ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_device_remote_type") != nullptr;
}

// The GPU a single budget is for: the first local one, else the first on an RPC host
static ggml_backend_dev_t pi_the_gpu(const std::vector<ggml_backend_dev_t> & devs) {
    ggml_backend_dev_t remote = nullptr;
    for (ggml_backend_dev_t d : devs) {
        if (d == nullptr || !llama_pi_dev_is_gpu(d)) {
            continue;
        }
        if (!pi_dev_is_remote(d)) {
            return d;
        }
        remote = remote ? remote : d;
    }
    return remote;
}

int64_t llama_pi_auto_budget(size_t free, size_t total) {
    return (int64_t) free - ((512ll << 20) + (int64_t) (total / 50));
}

int64_t llama_pi_auto_vram_budget(void) {
    std::vector<ggml_backend_dev_t> all(ggml_backend_dev_count());
    for (size_t i = 0; i < all.size(); ++i) {
        all[i] = ggml_backend_dev_get(i);
    }
    ggml_backend_dev_t gpu = pi_the_gpu(all);
    if (gpu == nullptr) {
        return -1;
    }
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(gpu, &free, &total);
    return std::max<int64_t>(0, llama_pi_auto_budget(free, total));
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

// A device's part of a plan: its budget and what it is; then the layers it takes
struct pi_device_share {
    ggml_backend_dev_t dev;      // null: a plan made without a GPU (plan_without_gpu, tests)
    int64_t budget   = 0;        // bytes
    bool    is_auto  = false;
    bool    gpu      = true;     // a GPU: its layers' hottest rows with them, the rest in CPU memory;
                                 // else (an RPC host's CPU) whole layers, rows and all
    int     n_layers = 0;        // as llama.cpp counts them (the output layer is one)
};

static std::string pi_dev_label(ggml_backend_dev_t dev) {
    if (dev == nullptr) {
        return "the GPU";
    }
    std::string label = ggml_backend_dev_name(dev);
    if (pi_dev_is_remote(dev)) {
        label += std::string(" (") + ggml_backend_dev_description(dev) + ", " +
                 (llama_pi_dev_is_gpu(dev) ? "GPU" : "CPU") + ")";
    }
    return label;
}

// One device's budget in bytes from what was given (-1: auto), checked against its memory
static int64_t pi_budget_of(ggml_backend_dev_t dev, int64_t given, const std::string & what) {
    if (given < -1) {
        throw std::runtime_error("powerinfer: " + what + " = " + std::to_string(given) + " (give bytes >= 0, or -1 for auto)");
    }
    size_t free = 0, total = 0;
    if (dev != nullptr) {
        ggml_backend_dev_memory(dev, &free, &total);
    } else if (given == -1) {
        throw std::runtime_error("powerinfer: " + what + " auto needs a GPU");
    }
    if (given == -1) {
        const int64_t budget = llama_pi_auto_budget(free, total);
        if (budget <= 0) {
            throw std::runtime_error("powerinfer: " + what + " auto: " + pi_dev_label(dev) + " has only " + pi_gib((double) free) + " free");
        }
        return budget;
    }
    if (total > 0 && (size_t) given > total) {
        throw std::runtime_error("powerinfer: " + what + " " + pi_gib((double) given) + " exceeds " + pi_dev_label(dev) + "'s " +
                                 pi_gib((double) total));
    }
    return given;
}

// powerinfer.runtime.vram_budget: one budget, for the GPU (the first local one, else the first on
// an RPC host); llama.cpp's other devices take no layers.
static std::vector<pi_device_share> pi_gpu_budget(const llama_model_base & model, const llama_model_loader & ml, int64_t budget_in) {
    if (budget_in < -1) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_BUDGET " = " + std::to_string(budget_in) +
                                 " (give bytes >= 0, or -1 for auto)");
    }
    std::vector<pi_device_share> shares;
    std::vector<ggml_backend_dev_t> devs;
    for (const auto & d : model.devices) {
        devs.push_back(d.is_meta ? nullptr : d.dev);
        shares.push_back({ devs.back() });
    }
    ggml_backend_dev_t gpu = pi_the_gpu(devs);
    if (gpu == nullptr) {
        if (!llama_pi_runtime_bool(ml, LLAMA_PI_KEY_RT_PLAN_NO_GPU, false)) {
            throw std::runtime_error("powerinfer: a VRAM budget was given but llama.cpp has no GPU device "
                                     "(a CPU-only build, or no GPU found; an RPC host's CPU takes a budget of its own: "
                                     "vram_budget='HOST:PORT=SIZE' in Python, " LLAMA_PI_KEY_RT_DEVICE_BUDGETS
                                     " as a key); use a budget of 0");
        }
        // (plan_without_gpu, tests: the plan is made and logged; with no GPU every part stays on the CPU)
        return { { nullptr, pi_budget_of(nullptr, budget_in, "vram_budget"), budget_in == -1, true } };
    }
    for (auto & s : shares) {
        if (s.dev == gpu) {
            s.budget = pi_budget_of(gpu, budget_in, "vram_budget");
            s.is_auto = budget_in == -1;
        }
    }
    return shares;
}

// powerinfer.runtime.device_budgets, "NAME=BYTES,NAME=BYTES" (-1: auto): a budget per device by its
// ggml name (CUDA0, RPC1, ...); a device not named takes no layers.
static std::vector<pi_device_share> pi_device_budgets(const llama_model_base & model, const std::string & spec) {
    std::vector<pi_device_share> shares;
    std::string names;
    for (const auto & d : model.devices) {
        shares.push_back({ d.is_meta ? nullptr : d.dev });
        names += (names.empty() ? "" : ", ") + (d.is_meta ? std::string("(meta)") : pi_dev_label(d.dev));
    }
    std::vector<bool> seen(shares.size(), false);
    size_t pos = 0;
    while (pos <= spec.size()) {
        const size_t end = std::min(spec.find(',', pos), spec.size());
        const std::string item = spec.substr(pos, end - pos);
        const size_t eq = item.find('=');
        char * num_end = nullptr;
        errno = 0;
        const long long bytes = eq == std::string::npos ? 0 : strtoll(item.c_str() + eq + 1, &num_end, 10);
        if (eq == std::string::npos || eq == 0 || num_end == item.c_str() + eq + 1 || *num_end != '\0' || errno == ERANGE) {
            throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_DEVICE_BUDGETS ": '" + item + "' is not NAME=BYTES");
        }
        const std::string name = item.substr(0, eq);
        size_t i = 0;
        while (i < shares.size() && !(shares[i].dev && name == ggml_backend_dev_name(shares[i].dev))) {
            ++i;
        }
        if (i == shares.size()) {
            throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_DEVICE_BUDGETS ": no device " + name + " (this model's devices: " +
                                     (names.empty() ? "none" : names) + ")");
        }
        if (seen[i]) {
            throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_DEVICE_BUDGETS ": " + name + " is given twice");
        }
        seen[i] = true;
        shares[i].budget  = pi_budget_of(shares[i].dev, bytes, std::string("the budget of ") + name);
        shares[i].is_auto = bytes == -1;
        shares[i].gpu     = llama_pi_dev_is_gpu(shares[i].dev);
        pos = end + 1;
    }
    return shares;
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

// One chunk of a large ubatch's dense FFN on the GPU as it comes over: its gate, up and down rows
static int64_t pi_chunk_bytes(const llama_model_loader & ml, int64_t n_ff_max, int64_t n_ff0) {
    const int64_t rows = std::min(n_ff_max, LLAMA_PI_GPU_CHUNK_ROWS);
    return rows * 3 * ((int64_t) pi_bytes_of(ml, "blk.0.ffn_gate.weight") / n_ff0);
}

// The staging of a large ubatch's dense FFN on the GPU: two chunks of rows in CPU memory brought
// over (gate, up, down: the next chunk's cross the bus during this one's GEMMs), a quantized down
// dequantized to F32 and, where the GPU's out_prod does not read that down
// (llama-powerinfer-graph.cpp), its transposed copy.
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
    return 2 * pi_chunk_bytes(ml, n_ff_max, n_ff0) + rows * ((quantized ? down_b : 0) + (out_prod ? 0 : down_b));
}

// Compute buffers of a prompt ubatch (n_ub tokens) on the GPU. llama.cpp's allocator reuses memory
// from one part of the graph to the next, so its buffer is the largest part, not their sum (the
// sum held back 2.4x what was allocated: docs/NOTES.md): attention (scores and their softmax, and
// the next layer's first chunk prefetched during the layer before: llama-powerinfer-graph.cpp), the
// FFN (score, its difference from the threshold, the mask and its transpose over every row; gate,
// up and h of a chunk; the chunks' staging) or the output (logits of every token), all F32, with the residual
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
    const int64_t attention = n_ub * 4 * (2 * n_head_max * n_ctx + 4 * n_embd) +
                              (gpu ? pi_chunk_bytes(ml, n_ff_max, hp.n_ff(0)) : 0);
    const int64_t ffn = (gpu ? pi_staging_bytes(ml, gpu, n_ff_max, hp.n_ff(0)) : 0) +
                        n_ub * 4 * (4 * n_ff_max + 3 * std::min(n_ff_max, LLAMA_PI_GPU_CHUNK_ROWS));
    const int64_t output = n_ub * 4 * ((int64_t) model.vocab.n_tokens() + n_embd);
    const int64_t reserve = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_VRAM_RESERVE,
        (64ll << 20) + n_ub * 4 * 2 * n_embd + std::max({ attention, ffn, output }));
    if (reserve < 0) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_RESERVE " must be >= 0");
    }
    return reserve;
}

static void pi_log_plan(const pi_device_share & d, const llama_pi_plan_result & res, int first, int n_layer, int64_t n_ctx,
                        int64_t reserve, const llama_hparams & hp) {
    const int last = first + res.n_layers_gpu - 1;
    const std::string layers = res.n_layers_gpu == 0 ? "no layers" :
        "layers " + std::to_string(first) + "-" + std::to_string(last) + " of " + std::to_string(n_layer);
    const bool output = d.n_layers > res.n_layers_gpu;
    LLAMA_LOG_INFO("%s: powerinfer: %s budget %s%s: %s (attention, predictor, KV for %" PRId64 " tokens%s)%s, %s; ",
                   __func__, pi_dev_label(d.dev).c_str(), pi_gib((double) d.budget).c_str(), d.is_auto ? " (auto)" : "",
                   layers.c_str(), n_ctx, d.gpu ? "" : ", all FFN rows", output ? " + output" : "", pi_gib((double) res.fixed_bytes).c_str());
    if (d.gpu) {
        LLAMA_LOG_CONT("hot FFN rows %s (%.1f%% of these layers' activation mass); ", pi_gib((double) res.rows_bytes).c_str(),
                       100.0 * res.mass_share);
    }
    LLAMA_LOG_CONT("compute reserve %s\n", pi_gib((double) reserve).c_str());
    if (!d.gpu || res.n_layers_gpu == 0) {
        return;
    }
    std::string line;
    for (int il = first; il <= last; ++il) {
        line += std::to_string(il) + ":" + std::to_string(hp.pi.dev_rows[il]) + (il < last ? " " : "");
    }
    LLAMA_LOG_INFO("%s: powerinfer: %s rows per layer (of %u) %s\n", __func__, pi_dev_label(d.dev).c_str(), hp.n_ff(0), line.c_str());
}

// The plan's settings that hold for every device
struct pi_plan_setting {
    int64_t n_ctx;      // KV cache reserved for this many tokens
    int64_t split_us;   // a split layer's hand-off per token
    size_t  out_bytes;  // the output layer and its norm
    bool    per_device; // budgets per device (else one budget, the GPU's)
};

static pi_plan_setting pi_plan_settings(const llama_model_base & model, const llama_model_loader & ml, bool per_device) {
    const llama_hparams & hp = model.hparams;
    const int64_t n_ctx = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_VRAM_CTX, std::max<int64_t>(1, std::min<int64_t>(4096, hp.n_ctx_train)));
    if (n_ctx < 1 || n_ctx > (1 << 24)) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_VRAM_CTX " = " + std::to_string(n_ctx) + " is outside 1..16777216");
    }
    const int64_t split_us = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_SPLIT_COST_US, 70);
    if (split_us < 0 || split_us > 1000000) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_SPLIT_COST_US " = " + std::to_string(split_us) + " is outside 0..1000000");
    }
    size_t out_bytes = pi_bytes_of(ml, "output_norm.weight");
    out_bytes += ml.get_tensor_meta("output.weight") ? pi_bytes_of(ml, "output.weight") : pi_bytes_of(ml, "token_embd.weight");
    return { n_ctx, split_us, out_bytes, per_device };
}

// One device's layers: whole layers from layer n_left - 1 down (the output layer first when
// `output`), then, on a GPU, the hottest rows of those layers. Fills their dev_rows; returns the
// layers taken (not counting the output).
static int pi_plan_device(llama_model_base & model, llama_model_loader & ml, pi_device_share & d, int n_left, bool output,
                          int cap, const pi_plan_setting & set) {
    llama_hparams & hp = model.hparams;
    std::vector<std::vector<float>> freq;
    std::vector<llama_pi_plan_layer> cost = pi_layer_costs(model, ml, set.n_ctx, d.gpu ? d.dev : nullptr, freq);
    if (!d.gpu) { // a CPU's layers keep their rows: part of what each layer costs it
        for (auto & c : cost) {
            c.base_bytes += c.row_bytes * (uint64_t) c.n_rows;
            c.gpu_rows = 0;
        }
    }
    const int64_t reserve = pi_compute_reserve(model, ml, set.n_ctx, d.gpu ? d.dev : nullptr);
    const llama_pi_plan_params params = { output ? set.out_bytes : 0, d.budget - reserve, cap, set.split_us };
    const llama_pi_plan_result res = llama_pi_plan_layers(cost.data(), n_left, params);
    if (res.n_gpu_layers < 0 && output) {
        throw std::runtime_error("powerinfer: the budget of " + pi_dev_label(d.dev) + ", " + pi_gib((double) d.budget) +
                                 ", cannot hold the output layer (" + pi_gib((double) set.out_bytes) + ") plus " +
                                 pi_gib((double) reserve) + " of compute buffers: give at least " +
                                 pi_gib((double) (reserve + set.out_bytes + cost[n_left - 1].base_bytes)) +
                                 (set.per_device ? ", or no budget for this device" : ", or 0 for CPU-only"));
    }
    if (res.n_gpu_layers < 0) {
        throw std::runtime_error("powerinfer: the budget of " + pi_dev_label(d.dev) + ", " + pi_gib((double) d.budget) +
                                 ", is below its " + pi_gib((double) reserve) + " of compute buffers: give at least " +
                                 pi_gib((double) (reserve + cost[n_left - 1].base_bytes)) + " (a layer more), or no budget");
    }
    const int first = n_left - res.n_layers_gpu;
    for (int il = first; il < n_left; ++il) {
        hp.pi.dev_rows[il] = (uint32_t) (d.gpu ? res.dev_rows[il] : hp.n_ff(il));
    }
    d.n_layers = output ? res.n_gpu_layers : res.n_layers_gpu; // the output layer counts one (unless capped away)
    pi_log_plan(d, res, first, (int) hp.n_layer(), set.n_ctx, reserve, hp);
    return res.n_layers_gpu;
}

// Plans the budgets, devices from the last (llama.cpp gives them layers in order, the output layer
// to the last): fills hparams.pi.dev_rows and, with several devices, the layers each takes
// (hparams.pi.dev_split, llama.cpp's tensor_split). A single budget (not `per_device`) over local
// GPUs leaves the split to llama.cpp, as before budgets per device. Returns n_gpu_layers.
static int pi_plan_budgets(llama_model_base & model, llama_model_loader & ml, int n_gpu_layers, std::vector<pi_device_share> & shares,
                           bool per_device) {
    llama_hparams & hp = model.hparams;
    const pi_plan_setting set = pi_plan_settings(model, ml, per_device);
    int n_left = (int) hp.n_layer(), total = 0;
    bool remote = false;
    for (int i = (int) shares.size() - 1; i >= 0; --i) {
        remote = remote || (shares[i].dev != nullptr && pi_dev_is_remote(shares[i].dev));
        if (shares[i].budget <= 0 || (n_left == 0 && total > 0)) {
            continue;
        }
        const int cap = n_gpu_layers < 0 ? -1 : std::max(0, n_gpu_layers - total) + (total > 0 ? 1 : 0);
        n_left -= pi_plan_device(model, ml, shares[i], n_left, total == 0, cap, set);
        total += shares[i].n_layers;
    }
    hp.pi.placed = true;
    if (shares.size() > 1 && total > 0 && (per_device || remote)) {
        if (model.split_mode() != LLAMA_SPLIT_MODE_LAYER) {
            if (!per_device) {
                return total;
            }
            throw std::runtime_error("powerinfer: budgets per device place whole layers: use split mode layer");
        }
        const float * given = model.tensor_split();
        if (given && std::any_of(given, given + shares.size(), [](float x) { return x != 0.0f; })) {
            LLAMA_LOG_WARN("%s: powerinfer: the budgets decide each device's layers: tensor_split is not used\n", __func__);
        }
        if (shares.size() > hp.pi.dev_split.size()) {
            throw std::runtime_error("powerinfer: budgets over more than " + std::to_string(hp.pi.dev_split.size()) + " devices");
        }
        for (size_t i = 0; i < shares.size(); ++i) {
            hp.pi.dev_split[i] = (float) shares[i].n_layers;
        }
        hp.pi.split_devices = true;
    }
    return total;
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
    const std::string per_device = llama_pi_runtime_str(ml, LLAMA_PI_KEY_RT_DEVICE_BUDGETS, "");
    const int64_t forced    = llama_pi_runtime_int(ml, LLAMA_PI_KEY_RT_DEV_ROWS, -1);
    if (budget_in != INT64_MIN && !per_device.empty()) {
        throw std::runtime_error("powerinfer: give " LLAMA_PI_KEY_RT_VRAM_BUDGET " or " LLAMA_PI_KEY_RT_DEVICE_BUDGETS ", not both");
    }
    int ngl = n_gpu_layers;
    hp.pi.split_devices = false;
    hp.pi.dev_split.fill(0.0f);
    if (!per_device.empty()) {
        std::vector<pi_device_share> shares = pi_device_budgets(model, per_device);
        ngl = pi_plan_budgets(model, ml, n_gpu_layers, shares, true);
    } else if (budget_in == 0) {
        ngl = 0;
    } else if (budget_in != INT64_MIN) {
        std::vector<pi_device_share> shares = pi_gpu_budget(model, ml, budget_in);
        ngl = pi_plan_budgets(model, ml, n_gpu_layers, shares, false);
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

