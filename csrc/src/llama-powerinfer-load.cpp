// powerinfer_gguf: what a file of our layout holds: the FFN activation, our keys (checked), the
// run-time keys (kv overrides first), and each layer's tensors with their shapes and types checked.
#include "llama-powerinfer-impl.h"

#include "llama-impl.h"
#include "llama-model.h"
#include "llama-model-loader.h"

#include "gguf.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cinttypes>
#include <climits>
#include <cmath>
#include <iterator>
#include <stdexcept>
#include <string>

void llama_pi_load_ffn_act(llama_model_loader & ml, llama_hparams & hparams) {
    std::string act;
    hparams.pi.ffn_act = LLAMA_PI_ACT_SILU;
    if (!ml.get_key(LLM_KV_HIDDEN_ACT, act, false)) {
        return;
    }
    if (act == "silu" || act == "swiglu") {
        hparams.pi.ffn_act = LLAMA_PI_ACT_SILU;
    } else if (act == "relu" || act == "reglu") {
        hparams.pi.ffn_act = LLAMA_PI_ACT_RELU;
    } else if (act == "drelu") {
        hparams.pi.ffn_act = LLAMA_PI_ACT_DRELU;
    } else {
        throw std::runtime_error("unsupported FFN activation '" + act + "' in " +
                                 ml.llm_kv(LLM_KV_HIDDEN_ACT) + " (known: silu, relu, drelu)");
    }
}

static std::string pi_str_key(const gguf_context * meta, const char * key) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        throw std::runtime_error(std::string("powerinfer: missing key ") + key);
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_STRING) {
        throw std::runtime_error(std::string("powerinfer: key ") + key + " is not a string");
    }
    return gguf_get_val_str(meta, id);
}

// A run-time key: a kv override of that name wins; the file may also carry it; else the default.
static const llama_model_kv_override * pi_override(const llama_model_loader & ml, const char * key,
                                                   llama_model_kv_override_type tag, const char * type_name) {
    const auto it = ml.kv_overrides.find(key);
    if (it == ml.kv_overrides.end()) {
        return nullptr;
    }
    if (it->second.tag != tag) {
        throw std::runtime_error(std::string("powerinfer: override ") + key + " must be " + type_name);
    }
    return &it->second;
}

bool llama_pi_runtime_bool(const llama_model_loader & ml, const char * key, bool def) {
    if (const auto * o = pi_override(ml, key, LLAMA_KV_OVERRIDE_TYPE_BOOL, "a bool")) {
        return o->val_bool;
    }
    const int64_t id = gguf_find_key(ml.metadata, key);
    if (id < 0) {
        return def;
    }
    if (gguf_get_kv_type(ml.metadata, id) != GGUF_TYPE_BOOL) {
        throw std::runtime_error(std::string("powerinfer: key ") + key + " is not a bool");
    }
    return gguf_get_val_bool(ml.metadata, id);
}

int64_t llama_pi_runtime_int(const llama_model_loader & ml, const char * key, int64_t def) {
    if (const auto * o = pi_override(ml, key, LLAMA_KV_OVERRIDE_TYPE_INT, "an int")) {
        return o->val_i64;
    }
    const int64_t id = gguf_find_key(ml.metadata, key);
    if (id < 0) {
        return def;
    }
    switch (gguf_get_kv_type(ml.metadata, id)) {
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(ml.metadata, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(ml.metadata, id);
        default: throw std::runtime_error(std::string("powerinfer: key ") + key + " is not a 32-bit integer");
    }
}

std::string llama_pi_runtime_str(const llama_model_loader & ml, const char * key, const char * def) {
    if (const auto * o = pi_override(ml, key, LLAMA_KV_OVERRIDE_TYPE_STR, "a string")) {
        return o->val_str;
    }
    return gguf_find_key(ml.metadata, key) < 0 ? std::string(def) : pi_str_key(ml.metadata, key);
}

static uint32_t pi_runtime_way(const llama_model_loader & ml) {
    static const char * names[] = { "auto", "pairs", "tiles", "dense" }; // enum llama_pi_way
    const std::string way = llama_pi_runtime_str(ml, LLAMA_PI_KEY_RT_WAY, "auto");
    for (uint32_t i = 0; i < std::size(names); ++i) {
        if (way == names[i]) {
            return i;
        }
    }
    throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_RT_WAY " = '" + way + "' (known: auto, pairs, tiles, dense)");
}

// A float32 array key's values, or none when the file lacks it (it is optional)
static std::vector<float> pi_f32_array(const gguf_context * meta, const char * key) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        return {};
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, id) != GGUF_TYPE_FLOAT32) {
        throw std::runtime_error(std::string("powerinfer: ") + key + " is not an array of float32");
    }
    const float * v = (const float *) gguf_get_arr_data(meta, id);
    return std::vector<float>(v, v + gguf_get_arr_n(meta, id));
}

// select_per_fire from the predictors' held-out recall and precision
static void pi_load_select_per_fire(const gguf_context * meta, llama_pi_hparams & pi) {
    const std::vector<float> recall = pi_f32_array(meta, LLAMA_PI_KEY_PREDICTOR_RECALL);
    const std::vector<float> precision = pi_f32_array(meta, LLAMA_PI_KEY_PREDICTOR_PRECISION);
    for (size_t il = 0; il < pi.select_per_fire.size(); ++il) {
        const bool known = il < recall.size() && il < precision.size() && precision[il] > 0.0f && recall[il] > 0.0f;
        pi.select_per_fire[il] = known ? recall[il] / precision[il] : 1.0f;
    }
}

void llama_pi_load_meta(llama_model_loader & ml, llama_hparams & hparams) {
    const gguf_context * meta = ml.metadata;
    hparams.pi.sparse = false;
    const int64_t id_ver = gguf_find_key(meta, LLAMA_PI_KEY_FORMAT_VERSION);
    if (id_ver < 0) {
        return; // not our file: exactly as stock
    }
    if (gguf_get_kv_type(meta, id_ver) != GGUF_TYPE_UINT32) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_FORMAT_VERSION " is not a uint32");
    }
    const uint32_t ver = gguf_get_val_u32(meta, id_ver);
    if (ver != LLAMA_PI_FORMAT_VERSION) {
        throw std::runtime_error("powerinfer: unsupported format version " + std::to_string(ver) +
                                 " (this build reads " + std::to_string(LLAMA_PI_FORMAT_VERSION) + ")");
    }
    const int64_t id_sparse = gguf_find_key(meta, LLAMA_PI_KEY_SPARSE);
    if (id_sparse < 0) {
        return; // e.g. a synthetic model: only provenance keys
    }
    if (gguf_get_kv_type(meta, id_sparse) != GGUF_TYPE_BOOL) {
        throw std::runtime_error("powerinfer: " LLAMA_PI_KEY_SPARSE " is not a bool");
    }
    if (!gguf_get_val_bool(meta, id_sparse)) {
        return;
    }
    if (hparams.pi.ffn_act == LLAMA_PI_ACT_SILU) {
        throw std::runtime_error("powerinfer: a sparse layout needs a relu or drelu FFN, the file states silu");
    }
    const std::string layout = pi_str_key(meta, LLAMA_PI_KEY_FFN_DOWN_LAYOUT);
    if (layout != "neuron_rows") {
        throw std::runtime_error("powerinfer: unknown " LLAMA_PI_KEY_FFN_DOWN_LAYOUT " '" + layout + "'");
    }
    const std::string pact = pi_str_key(meta, LLAMA_PI_KEY_PREDICTOR_ACT);
    if (pact != "none" && pact != "relu") {
        throw std::runtime_error("powerinfer: unknown " LLAMA_PI_KEY_PREDICTOR_ACT " '" + pact + "'");
    }
    hparams.pi.pred_relu = pact == "relu";
    hparams.pi.sparse = true;
    pi_load_select_per_fire(meta, hparams.pi);

    hparams.pi.rt_sparse     = llama_pi_runtime_bool(ml, LLAMA_PI_KEY_RT_SPARSE, true);
    hparams.pi.rt_all_active = llama_pi_runtime_bool(ml, LLAMA_PI_KEY_RT_ALL_ACTIVE, false);
    hparams.pi.rt_way        = pi_runtime_way(ml);
}

static void pi_check_type(const ggml_tensor * t, std::initializer_list<ggml_type> allowed) {
    for (ggml_type a : allowed) {
        if (t->type == a) {
            return;
        }
    }
    std::string names;
    for (ggml_type a : allowed) {
        names += std::string(names.empty() ? "" : ", ") + ggml_type_name(a);
    }
    throw std::runtime_error(std::string("powerinfer: tensor ") + t->name + " has type " +
                             ggml_type_name(t->type) + " (allowed: " + names + ")");
}

void llama_pi_create_layer_tensors(llama_model_base & model, llama_layer & layer, int il) {
    llama_model_loader & ml = *model.ml;
    const LLM_TN tn(model.arch);
    const int64_t n_embd = model.hparams.n_embd;
    const int64_t n_ff   = model.hparams.n_ff(il);
    const std::string fc1_name = tn(LLM_TENSOR_PI_PRED_FC1, "weight", il);
    const ggml_tensor * fc1_meta = ml.get_tensor_meta(fc1_name.c_str());
    if (fc1_meta == nullptr) {
        throw std::runtime_error("powerinfer: tensor " + fc1_name + " is missing");
    }
    const int64_t rank = fc1_meta->ne[1];
    if (rank < 1 || rank > std::max(n_embd, n_ff)) {
        throw std::runtime_error("powerinfer: " + fc1_name + " has rank " + std::to_string(rank) +
                                 ", outside 1.." + std::to_string(std::max(n_embd, n_ff)));
    }
    // Placement (llama-powerinfer-placement.cpp): rows [0, h) where the layer runs, [h, n_ff) in CPU memory. h = n_ff:
    // whole on the layer's device; h = 0: whole in CPU memory; else each row tensor is split in two
    // over the file's bytes. create_tensor checks each shape and fails the load naming the tensor.
    const int64_t h = model.hparams.pi.placed ? model.hparams.pi.dev_rows[il] : n_ff;
    // rows in CPU memory go to a GPU's pinned host buffers when there is a GPU: large ubatches copy
    // them to the GPU, 3.5x faster from pinned memory (13B at budget 0, docs/NOTES.md), and decode
    // read them as fast as from plain memory with 2 MB pages (which a CPU-only machine gets)
    const bool layer_on_cpu = ggml_backend_dev_type(model.dev_layer(il)) == GGML_BACKEND_DEVICE_TYPE_CPU;
    auto rows_tensor = [&](llm_tensor t, const char * suffix, std::initializer_list<int64_t> full, ggml_tensor ** cold) {
        const std::string name = tn(t, suffix, il);
        if (h == n_ff && !layer_on_cpu) {
            return model.create_tensor(tn(t, suffix, il), full, 0);
        }
        if (h == n_ff || h == 0) {
            return model.create_tensor_cpu(tn(t, suffix, il), full, 0);
        }
        const std::string cold_name = name + ".cold"; // split in the loader by llama_pi_plan_placement
        const bool vec = full.size() == 1;
        const int64_t ne0 = *full.begin();
        ggml_tensor * hot = vec ? model.create_tensor(tn(t, suffix, il), {h}, 0)
                                : model.create_tensor(tn(t, suffix, il), {ne0, h}, 0);
        const std::string cold_suffix = suffix ? std::string(suffix) + ".cold" : "cold"; // outlives cold_tn
        const LLM_TN_IMPL cold_tn = tn(t, cold_suffix.c_str(), il);
        GGML_ASSERT(cold_tn.str() == cold_name);
        *cold = vec ? model.create_tensor_cpu(cold_tn, {n_ff - h}, 0)
                    : model.create_tensor_cpu(cold_tn, {ne0, n_ff - h}, 0);
        return hot;
    };
    layer.ffn_gate          = rows_tensor(LLM_TENSOR_PI_FFN_GATE, "weight", {n_embd, n_ff}, &layer.pi.ffn_gate_cold);
    layer.ffn_up            = rows_tensor(LLM_TENSOR_PI_FFN_UP, "weight", {n_embd, n_ff}, &layer.pi.ffn_up_cold);
    layer.pi.ffn_down_t     = rows_tensor(LLM_TENSOR_PI_FFN_DOWN_T, "weight", {n_embd, n_ff}, &layer.pi.ffn_down_t_cold);
    layer.pi.pred_threshold = rows_tensor(LLM_TENSOR_PI_PRED_THRESHOLD, nullptr, {n_ff}, &layer.pi.pred_threshold_cold);
    layer.pi.pred_fc1       = model.create_tensor(tn(LLM_TENSOR_PI_PRED_FC1, "weight", il), {n_embd, rank}, 0);
    layer.pi.pred_fc2       = model.create_tensor(tn(LLM_TENSOR_PI_PRED_FC2, "weight", il), {rank, n_ff}, 0);
    // read by the planner only: CPU memory, never VRAM
    layer.pi.neuron_freq    = model.create_tensor_cpu(tn(LLM_TENSOR_PI_NEURON_FREQ, nullptr, il), {n_ff}, 0);

    // shapes are checked above; types are ours to check, since kernels read rows by type
    pi_check_type(layer.pi.pred_threshold, {GGML_TYPE_F32});
    pi_check_type(layer.pi.neuron_freq,    {GGML_TYPE_F32});
    // predictors: mul_mat reads any type; pi-quantize writes them F16 or Q8_0 (docs/NOTES.md)
    pi_check_type(layer.pi.pred_fc1,       {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0});
    pi_check_type(layer.pi.pred_fc2,       {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0});
    // rows: what pi-quantize writes (Q4_K_M mixes Q4_K and Q6_K rows)
    const std::initializer_list<ggml_type> row_types = {
        GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K };
    pi_check_type(layer.ffn_gate,      row_types);
    pi_check_type(layer.ffn_up,        row_types);
    pi_check_type(layer.pi.ffn_down_t, row_types);
    if (layer.ffn_gate_b || layer.ffn_up_b || layer.ffn_down_b) {
        throw std::runtime_error("powerinfer: layer " + std::to_string(il) +
                                 " has FFN biases, which the sparse layout does not support");
    }
    if (layer.ffn_gate->type != layer.ffn_up->type) {
        throw std::runtime_error("powerinfer: layer " + std::to_string(il) + ": ffn_gate is " +
                                 ggml_type_name(layer.ffn_gate->type) + " but ffn_up is " +
                                 ggml_type_name(layer.ffn_up->type) + " (the sparse FFN needs one type)");
    }
}

// Expected share of rows [0, n) that some token of a T-token ubatch selects, tokens taken as
// independent: the mean over rows of 1 - (1 - p)^T, p a row's firing frequency times `per_fire`
static double pi_expected_union(const float * freq, int64_t n, double per_fire, int64_t T) {
    double sum = 0.0;
    for (int64_t r = 0; r < n; ++r) {
        const double p = std::min(1.0, std::max(0.0, (double) freq[r] * per_fire));
        sum += p >= 1.0 ? 1.0 : -std::expm1((double) T * std::log1p(-p));
    }
    return sum / (double) n;
}

// The fewest tokens from which that share reaches LLAMA_PI_GATHER_MAX_SHARE (it grows with T)
static int32_t pi_copy_all_from(const float * freq, int64_t n, double per_fire) {
    int64_t lo = 1, hi = 1 << 20;
    if (pi_expected_union(freq, n, per_fire, hi) < LLAMA_PI_GATHER_MAX_SHARE) {
        return INT32_MAX;
    }
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (pi_expected_union(freq, n, per_fire, mid) >= LLAMA_PI_GATHER_MAX_SHARE) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return (int32_t) lo;
}

// copy_all_from of a layer's parts, from its neuron frequencies (in host memory once loaded)
static void pi_plan_copies(const llama_pi_hparams & pi, llama_layer & layer, int il) {
    const ggml_tensor * freq = layer.pi.neuron_freq;
    if (freq == nullptr || freq->data == nullptr || freq->buffer == nullptr || !ggml_backend_buffer_is_host(freq->buffer)) {
        return;
    }
    const ggml_tensor * parts[2] = { layer.ffn_gate, layer.pi.ffn_gate_cold };
    int64_t r0 = 0;
    for (int part = 0; part < 2 && parts[part] != nullptr; ++part) {
        const int64_t n_rows = parts[part]->ne[1];
        layer.pi.copy_all_from[part].clear();
        if (parts[part]->buffer == nullptr || !ggml_backend_buffer_is_host(parts[part]->buffer)) {
            r0 += n_rows; // rows in a device's memory: never brought over
            continue;
        }
        for (int64_t c0 = 0; c0 < n_rows; c0 += LLAMA_PI_GPU_CHUNK_ROWS) {
            const int64_t n = std::min(LLAMA_PI_GPU_CHUNK_ROWS, n_rows - c0);
            layer.pi.copy_all_from[part].push_back(
                pi_copy_all_from((const float *) freq->data + r0 + c0, n, pi.select_per_fire[il]));
        }
        r0 += n_rows;
    }
}

static void pi_alloc_counters(llama_model_base & model) {
    for (size_t il = 0; il < model.layers.size(); ++il) {
        llama_layer & layer = model.layers[il];
        auto store = std::make_shared<llama_pi_counter_store>();
        store->ctx.reset(ggml_init({ 2 * ggml_tensor_overhead(), nullptr, true }));
        auto counters_by = [&](const ggml_tensor * rows, const char * name) -> ggml_tensor * {
            if (rows == nullptr || rows->buffer == nullptr) {
                return nullptr;
            }
            ggml_tensor * t = ggml_new_tensor_1d(store->ctx.get(), GGML_TYPE_I64, GGML_PI_N_STATS);
            ggml_format_name(t, "blk.%zu.%s", il, name);
            ggml_backend_buffer_type_t buft = ggml_backend_buffer_is_host(rows->buffer) ? ggml_backend_cpu_buffer_type()
                                                                                      : ggml_backend_buffer_get_type(rows->buffer);
            ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, ggml_backend_buft_get_alloc_size(buft, t));
            if (buf == nullptr) {
                throw std::runtime_error(std::string("powerinfer: cannot allocate ") + t->name + " in " + ggml_backend_buft_name(buft));
            }
            store->bufs.emplace_back(buf);
            if (ggml_backend_tensor_alloc(buf, t, ggml_backend_buffer_get_base(buf)) != GGML_STATUS_SUCCESS) {
                throw std::runtime_error(std::string("powerinfer: cannot place ") + t->name + " in " + ggml_backend_buft_name(buft));
            }
            ggml_backend_buffer_clear(buf, 0);
            return t;
        };
        layer.pi.counters      = counters_by(layer.ffn_gate, "pi_counters");
        layer.pi.counters_cold = counters_by(layer.pi.ffn_gate_cold, "pi_counters_cold");
        layer.pi.counter_store = std::move(store);
    }
}

// Whether a GPU is there to bring rows in CPU memory over (else nothing is ever copied)
static bool pi_any_gpu() {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        if (llama_pi_dev_is_gpu(ggml_backend_dev_get(i))) {
            return true;
        }
    }
    return false;
}

void llama_pi_auto_load_mode(const llama_model_base & model, llama_model_loader & ml) {
    if (!model.hparams.pi.sparse || !ml.use_mmap) {
        return;
    }
    for (const auto & d : model.devices) {
        // a discrete GPU's: an integrated one shares the memory a mapping reads from
        if (!d.is_meta && ggml_backend_dev_type(d.dev) == GGML_BACKEND_DEVICE_TYPE_GPU &&
            ggml_backend_dev_host_buffer_type(d.dev) != nullptr) {
            ml.use_mmap = false;
            LLAMA_LOG_INFO("%s: powerinfer: load mode auto: the rows in CPU memory are loaded into %s's pinned host "
                           "memory, not mapped (large ubatches bring them to it; give a load mode to choose)\n",
                           __func__, ggml_backend_dev_name(d.dev));
            return;
        }
    }
}

void llama_pi_loaded(llama_model_base & model) {
    if (!model.hparams.pi.sparse) {
        return;
    }
    pi_alloc_counters(model);
    std::vector<int32_t> from;
    for (size_t il = 0; il < model.layers.size() && pi_any_gpu(); ++il) {
        llama_layer & layer = model.layers[il];
        pi_plan_copies(model.hparams.pi, layer, (int) il);
        for (const std::vector<int32_t> & part : layer.pi.copy_all_from) {
            from.insert(from.end(), part.begin(), part.end());
        }
    }
    if (!from.empty()) {
        std::sort(from.begin(), from.end());
        auto tokens = [](int32_t t) { return t == INT32_MAX ? std::string("never") : std::to_string(t); };
        LLAMA_LOG_INFO("%s: powerinfer: a large ubatch brings FFN rows in CPU memory to the GPU %zu chunks of %" PRId64
                       " rows at a time, a chunk whole from %s tokens (median; %s to %s), below that only the rows "
                       "its tokens select\n", __func__, from.size(), LLAMA_PI_GPU_CHUNK_ROWS, tokens(from[from.size() / 2]).c_str(),
                       tokens(from.front()).c_str(), tokens(from.back()).c_str());
    }
}
