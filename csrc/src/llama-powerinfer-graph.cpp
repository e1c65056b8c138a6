// powerinfer_gguf: the FFN of a llama-family graph: dense with the file's activation, or, for a
// file of our layout, predictor + one way per part of the layer (hot rows, cold rows), added.
#include "llama-powerinfer-impl.h"

#include "llama-model.h"

#include "ggml-powerinfer.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdio>
#include <vector>

// Whether the GPU runs out_prod(w, h^T) for a weight of w's type and shape
static bool pi_gpu_out_prod(ggml_backend_t gpu, const ggml_tensor * w, const ggml_tensor * h) {
    llama_pi_probe_ctx probe_ctx;
    ggml_tensor * a = ggml_new_tensor_2d(probe_ctx.ctx, w->type, w->ne[0], w->ne[1]);
    ggml_tensor * b = ggml_new_tensor_2d(probe_ctx.ctx, GGML_TYPE_F32, h->ne[0], h->ne[1]);
    ggml_tensor * probe = ggml_out_prod(probe_ctx.ctx, a, ggml_transpose(probe_ctx.ctx, b)); // not in the graph
    return ggml_backend_supports_op(gpu, probe);
}

// Down projection of h [n_ff, T] with the weight stored one row per neuron: [n_embd, T]. On a
// GPU whose out_prod reads the weight's type (CUDA: F32, and F16 through pi-out-prod.cu), one
// GEMM over the rows as stored: out_prod(down_t, h^T). Elsewhere the weight is copied transposed
// and multiplied by mul_mat, which reaches the GEMM kernels: one extra pass over the down weight
// per ubatch, far cheaper than the CPU's out_prod over down_t (docs/NOTES.md).
// Its nodes (views aside) are added to `nodes`.
static ggml_tensor * pi_down_neuron_rows(ggml_context * ctx0, ggml_tensor * down_t, ggml_tensor * h, ggml_backend_t gpu,
                                         std::vector<ggml_tensor *> & nodes) {
    if (ggml_is_quantized(down_t->type)) {
        // quantized blocks run along a row: they are neither a GEMM operand as rows nor copied
        // transposed block-wise, so dequantize first, by get_rows of every row (CUDA's cast has no
        // K-quant source; its get_rows has them all, so the dense GPU way stays on the GPU)
        const int64_t n = down_t->ne[1];
        ggml_tensor * arange = ggml_arange(ctx0, 0.0f, (float) n, 1.0f);
        ggml_tensor * ids = ggml_cast(ctx0, arange, GGML_TYPE_I32);
        down_t = ggml_get_rows(ctx0, down_t, ids);
        nodes.insert(nodes.end(), { arange, ids, down_t });
    }
    ggml_tensor * out;
    if (gpu != nullptr && pi_gpu_out_prod(gpu, down_t, h)) {
        out = ggml_out_prod(ctx0, down_t, ggml_transpose(ctx0, h));
    } else {
        out = ggml_mul_mat(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, down_t)), h);
        nodes.push_back(out->src[0]);
    }
    nodes.push_back(out);
    return out;
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

// How a part runs for one ubatch (docs/DESIGN.md, "ways"): the sparse op where its rows are (the
// CPU kernel then picks pairs or tiles from the rows the ubatch selects), dense where its rows are,
// or dense on the GPU with rows in CPU memory brought over for the ubatch, chunk by chunk: only
// the rows some token selects (a gather the GPU reads from its pinned host memory), or, where the
// GPU cannot read them in place, every row (the scheduler's copy, as stock does with CPU weights
// and large ubatches). Every way computes the same neurons: the dense ways mask with the
// predictor's selection.
enum pi_way { PI_WAY_SPARSE, PI_WAY_DENSE, PI_WAY_DENSE_GPU };

// The device whose memory holds w: null for host memory (the local CPU's, pinned or not)
static ggml_backend_dev_t pi_rows_device(const ggml_tensor * w) {
    if (w->buffer == nullptr || ggml_backend_buffer_is_host(w->buffer)) {
        return nullptr;
    }
    return ggml_backend_buft_get_device(ggml_backend_buffer_get_type(w->buffer));
}

// The scheduler's backend on a device, else null
static ggml_backend_t pi_sched_backend(const llm_graph_context & g, ggml_backend_dev_t dev) {
    for (int i = 0; g.sched != nullptr && i < ggml_backend_sched_get_n_backends(g.sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(g.sched, i);
        if (ggml_backend_get_device(b) == dev) {
            return b;
        }
    }
    return nullptr;
}

// The GPU that runs the nodes of a weight in its memory (local or on an RPC host), else null
static ggml_backend_t pi_weight_gpu(const llm_graph_context & g, const ggml_tensor * w) {
    ggml_backend_dev_t dev = pi_rows_device(w);
    return dev != nullptr && llama_pi_dev_is_gpu(dev) ? pi_sched_backend(g, dev) : nullptr;
}

// The GPU that takes a large ubatch's work on CPU-resident weights: as llama.cpp's scheduler picks
// one for an op on weights in host memory, the first of its backends that is a GPU and wants the
// mul_mat w x of this many tokens (its own offload rule, e.g. CUDA's 32 tokens), when the context
// allows offloading (op_offload); else null.
static ggml_backend_t pi_offload_gpu(const llm_graph_context & g, ggml_tensor * w, ggml_tensor * x) {
    if (!g.cparams.op_offload || g.sched == nullptr) {
        return nullptr;
    }
    for (int i = 0; i < ggml_backend_sched_get_n_backends(g.sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(g.sched, i);
        if (!llama_pi_dev_is_gpu(ggml_backend_get_device(b))) {
            continue; // a CPU-only build asks no GPU, and builds no probe, per graph (every decoded token)
        }
        llama_pi_probe_ctx probe_ctx;
        ggml_tensor * probe = ggml_mul_mat(probe_ctx.ctx, w, x); // not in the graph: only asks the GPU
        if (ggml_backend_supports_op(b, probe) && ggml_backend_offload_op(b, probe)) {
            return b;
        }
    }
    return nullptr;
}

// The way of a part for this ubatch, and the GPU that takes it when it runs dense on a GPU with
// its rows in CPU memory. By what holds the rows: a GPU runs small ubatches sparse and larger ones
// dense; a CPU (this host's or an RPC host's) runs the sparse op, whose kernel picks pairs or tiles,
// unless a GPU here takes a large ubatch over rows in this host's memory.
static pi_way pi_choose_way(const llm_graph_context & g, const pi_ffn_part & p, ggml_tensor * cur, ggml_backend_t & gpu) {
    const llama_pi_hparams & pi = g.hparams.pi;
    const int64_t n_tokens = cur->ne[1];
    gpu = nullptr;
    if (!pi.rt_sparse || pi.rt_way == LLAMA_PI_WAY_DENSE) {
        return PI_WAY_DENSE;
    }
    if (pi.rt_way != LLAMA_PI_WAY_AUTO) {
        return PI_WAY_SPARSE; // pairs or tiles: the op everywhere (a GPU's kernel has one way)
    }
    ggml_backend_dev_t dev = pi_rows_device(p.gate);
    if (dev != nullptr) {
        return llama_pi_dev_is_gpu(dev) && n_tokens > PI_GPU_SPARSE_MAX_TOKENS ? PI_WAY_DENSE : PI_WAY_SPARSE;
    }
    gpu = pi_offload_gpu(g, p.gate, cur);
    return gpu ? PI_WAY_DENSE_GPU : PI_WAY_SPARSE;
}

// Whether the GPU reads w's rows where they lie (its pinned host memory), so that a gather moves
// only the rows a ubatch selects; otherwise the scheduler copies all of them over.
static bool pi_gpu_reads_in_place(ggml_backend_t gpu, ggml_tensor * w) {
    llama_pi_probe_ctx probe_ctx;
    ggml_tensor * count = ggml_new_tensor_1d(probe_ctx.ctx, GGML_TYPE_F32, w->ne[1]);
    ggml_tensor * probe = ggml_pi_gather_rows(probe_ctx.ctx, w, count); // not in the graph: only asks the GPU
    return ggml_backend_supports_op(gpu, probe) && ggml_pi_reads_in_place(gpu, probe, 0);
}

// A layer's parts: its hot rows, then (a split layer) its cold rows
static std::vector<pi_ffn_part> pi_layer_parts(const llama_layer & layer) {
    std::vector<pi_ffn_part> parts = { { layer.ffn_gate, layer.ffn_up, layer.pi.ffn_down_t, layer.pi.pred_threshold, 0 } };
    if (layer.pi.ffn_gate_cold) {
        parts.push_back({ layer.pi.ffn_gate_cold, layer.pi.ffn_up_cold, layer.pi.ffn_down_t_cold,
                          layer.pi.pred_threshold_cold, layer.ffn_gate->ne[1] });
    }
    return parts;
}

// Rows [c0, c0 + n) of a part's weights (its selection is the part's: pi_selection_rows)
static pi_ffn_part pi_part_rows(ggml_context * ctx0, const pi_ffn_part & p, int64_t c0, int64_t n) {
    auto rows = [&](ggml_tensor * w) { return ggml_view_2d(ctx0, w, w->ne[0], n, w->nb[1], c0 * w->nb[1]); };
    return { rows(p.gate), rows(p.up), rows(p.down_t), nullptr, p.r0 + c0 };
}

// A part's selection for a ubatch: mask [n_rows, T], 1 where the predictor selects (row, token)
// (score > threshold, as the sparse op reads it), else 0; count [1, n_rows], how many tokens select
// each row. Null without a predictor (every row computed); count only where it is asked for.
struct pi_selection {
    ggml_tensor * mask  = nullptr;
    ggml_tensor * count = nullptr;
};

// The selection over a whole part, its nodes on `gpu` when given. Built once before the part's
// chunks: its sources include the threshold, which may lie in CPU memory, and a GPU node reading
// a weight elsewhere starts a new split of the scheduler's (ggml-backend.cpp), which must not fall
// between a chunk's copy on the copy stream and its wait (a split ends its CUDA graph's capture).
static pi_selection pi_select(const llm_graph_context & g, ggml_tensor * score, ggml_tensor * threshold, int il,
                              ggml_backend_t gpu, bool with_count) {
    pi_selection s;
    if (score == nullptr) {
        return s;
    }
    ggml_context * ctx0 = g.ctx0;
    ggml_tensor * diff = ggml_sub(ctx0, score, threshold);
    s.mask = ggml_step(ctx0, diff);
    g.cb(s.mask, "ffn_pi_mask", il);
    std::vector<ggml_tensor *> nodes = { diff, s.mask };
    if (with_count) {
        ggml_tensor * by_row = ggml_cont(ctx0, ggml_transpose(ctx0, s.mask));
        s.count = ggml_sum_rows(ctx0, by_row);
        g.cb(s.count, "ffn_pi_count", il);
        nodes.insert(nodes.end(), { by_row, s.count });
    }
    if (gpu) {
        for (ggml_tensor * t : nodes) {
            ggml_backend_sched_set_tensor_backend(g.sched, t, gpu);
        }
    }
    return s;
}

// The selection of rows [c0, c0 + n) of a part (views)
static pi_selection pi_selection_rows(ggml_context * ctx0, const pi_selection & s, int64_t c0, int64_t n) {
    pi_selection r;
    if (s.mask) {
        r.mask = ggml_view_2d(ctx0, s.mask, n, s.mask->ne[1], s.mask->nb[1], c0 * s.mask->nb[0]);
    }
    if (s.count) {
        r.count = ggml_view_2d(ctx0, s.count, 1, n, s.count->nb[1], c0 * s.count->nb[1]);
    }
    return r;
}

// How the dense GPU way brings a chunk's rows in CPU memory over: the scheduler copies them all
// before its GEMMs (the GPU cannot read them in place), or, on the GPU's copy stream during the
// GEMMs of the chunk before, only the rows some token selects (SMs reading them over the bus), or
// all of them (its copy engine: the faster when a ubatch selects most of them)
enum pi_bring { PI_BRING_BY_SCHEDULER, PI_BRING_SELECTED, PI_BRING_WHOLE };

// The rows a dense way multiplies, and the predictor's selection over them (null: no predictor)
struct pi_dense_rows {
    pi_ffn_part   p;
    ggml_tensor * mask;
    bool          async; // p's gate, up and down_t are ggml_pi_gather_rows_async results
};

// Sets every node of `nodes` to run on gpu
static void pi_run_on(const llm_graph_context & g, const std::vector<ggml_tensor *> & nodes, ggml_backend_t gpu) {
    for (ggml_tensor * t : nodes) {
        ggml_backend_sched_set_tensor_backend(g.sched, t, gpu);
    }
}

// A chunk's rows as `bring` says, with its selection
static pi_dense_rows pi_bring_rows(const llm_graph_context & g, pi_ffn_part p, const pi_selection & sel, int il,
                                   ggml_backend_t gpu, pi_bring bring) {
    ggml_context * ctx0 = g.ctx0;
    if (bring == PI_BRING_SELECTED && sel.count == nullptr) {
        bring = PI_BRING_WHOLE; // every row is computed
    }
    const bool async = bring != PI_BRING_BY_SCHEDULER;
    if (async) {
        ggml_tensor * count = bring == PI_BRING_SELECTED ? sel.count : nullptr; // null: every row
        p.gate   = ggml_pi_gather_rows_async(ctx0, p.gate,   count);
        p.up     = ggml_pi_gather_rows_async(ctx0, p.up,     count);
        p.down_t = ggml_pi_gather_rows_async(ctx0, p.down_t, count);
        g.cb(p.gate, "ffn_pi_gathered_gate", il);
        g.cb(p.up, "ffn_pi_gathered_up", il);
        g.cb(p.down_t, "ffn_pi_gathered_down", il);
        if (gpu) {
            pi_run_on(g, { p.gate, p.up, p.down_t }, gpu);
        }
    }
    return { p, sel.mask, async };
}

// Dense FFN over selected rows: relu(gate x) * up x (dReLU: both rectified), masked by the
// selection when there is one, then the row-per-neuron down. With a GPU given, every node runs
// there.
static ggml_tensor * pi_dense_ffn(const llm_graph_context & g, ggml_tensor * cur, pi_dense_rows r,
                                  const llama_layer & layer, int il, ggml_backend_t gpu) {
    ggml_context * ctx0 = g.ctx0;
    std::vector<ggml_tensor *> nodes;
    auto node = [&](ggml_tensor * t) { nodes.push_back(t); return t; };
    pi_ffn_part & p = r.p;
    if (r.async) {
        p.gate   = node(ggml_pi_gathered(ctx0, p.gate));
        p.up     = node(ggml_pi_gathered(ctx0, p.up));
        p.down_t = node(ggml_pi_gathered(ctx0, p.down_t));
    }
    // lora scales apply to whole tensors only
    const bool whole = layer.pi.ffn_gate_cold == nullptr && p.gate->ne[1] == layer.ffn_gate->ne[1];
    ggml_tensor * up   = node(g.build_lora_mm(p.up,   cur, whole ? layer.ffn_up_s   : nullptr));
    ggml_tensor * gate = node(g.build_lora_mm(p.gate, cur, whole ? layer.ffn_gate_s : nullptr));
    g.cb(up, "ffn_pi_up", il);
    g.cb(gate, "ffn_pi_gate", il);
    if (g.hparams.pi.ffn_act == LLAMA_PI_ACT_DRELU) {
        up = node(ggml_relu(ctx0, up));
    }
    ggml_tensor * h = node(ggml_mul(ctx0, node(ggml_relu(ctx0, gate)), up));
    if (r.mask) {
        h = node(ggml_mul(ctx0, h, r.mask));
    }
    g.cb(h, "ffn_pi_h", il);
    ggml_tensor * out = pi_down_neuron_rows(ctx0, p.down_t, h, gpu ? gpu : pi_weight_gpu(g, p.down_t), nodes);
    g.cb(out, "ffn_pi_down", il);
    if (gpu) {
        pi_run_on(g, nodes, gpu);
    }
    return out;
}

// Dense FFN over one part where its rows are (GEMMs of the backend that holds them)
static ggml_tensor * pi_build_dense_part(const llm_graph_context & g, ggml_tensor * cur, const pi_ffn_part & p,
                                         ggml_tensor * score, const llama_layer & layer, int il) {
    const pi_selection sel = pi_select(g, score, p.threshold, il, nullptr, false);
    return pi_dense_ffn(g, cur, pi_bring_rows(g, p, sel, il, nullptr, PI_BRING_BY_SCHEDULER), layer, il, nullptr);
}

// How chunk k of a part comes over for a ubatch of n_tokens: whole once that many tokens are
// expected to select most of its rows (llama_pi_layer::copy_all_from), else only what they select
static pi_bring pi_bring_chunk(const llama_layer & layer, const pi_ffn_part & p, int64_t k, int64_t n_tokens) {
    const std::vector<int32_t> & from = layer.pi.copy_all_from[p.r0 == 0 ? 0 : 1];
    return k < (int64_t) from.size() && n_tokens >= from[k] ? PI_BRING_WHOLE : PI_BRING_SELECTED;
}

// The first chunk of layer il+1's part in CPU memory (the one the dense GPU way brings over),
// asked for in layer il's graph before its last chunk's GEMMs: the copy stream, otherwise idle from
// there until il+1's selection (il's last GEMMs, il+1's attention, predictor and hot rows), copies
// it meanwhile. Only where il+1 takes the dense GPU way on the same GPU, reading its rows in place,
// and is expected to copy that chunk whole anyway: the copy needs none of il+1's selection. Named
// for il+1 (ffn_pi_prefetch_*), where pi_prefetched finds it; a split of the scheduler's between
// them is safe: every CUDA graph's end joins the copy stream (patches/0002).
static void pi_prefetch_next(const llm_graph_context & g, const llama_layer & next, int il_next, ggml_tensor * cur,
                             ggml_backend_t gpu) {
    // the last layer's FFN runs on the output tokens only (llama.cpp's inp_out_ids), whose way this
    // ubatch's size does not tell
    const bool outputs_only = il_next == (int) g.hparams.n_layer() - 1 && g.n_outputs < cur->ne[1];
    if (next.pi.ffn_down_t == nullptr || outputs_only) {
        return;
    }
    const pi_ffn_part q = pi_layer_parts(next).back();
    ggml_backend_t q_gpu = nullptr;
    if (pi_choose_way(g, q, cur, q_gpu) != PI_WAY_DENSE_GPU || q_gpu != gpu || !pi_gpu_reads_in_place(gpu, q.gate) ||
        pi_bring_chunk(next, q, 0, cur->ne[1]) != PI_BRING_WHOLE) {
        return;
    }
    const int64_t n_rows = q.gate->ne[1];
    const int64_t n = std::min(LLAMA_PI_GPU_CHUNK_ROWS, n_rows);
    const pi_dense_rows r = pi_bring_rows(g, n == n_rows ? q : pi_part_rows(g.ctx0, q, 0, n), {}, il_next, gpu, PI_BRING_WHOLE);
    g.cb(r.p.gate, "ffn_pi_prefetch_gate", il_next);
    g.cb(r.p.up, "ffn_pi_prefetch_up", il_next);
    g.cb(r.p.down_t, "ffn_pi_prefetch_down", il_next);
    for (ggml_tensor * t : { r.p.gate, r.p.up, r.p.down_t }) {
        ggml_build_forward_expand(g.gf, t);
    }
}

// Part p's first n rows of layer il as pi_prefetch_next asked for them in the layer before, if it
// did: only for the part it asked for (the layer's last), whatever else lies in host memory
static bool pi_prefetched(const llm_graph_context & g, int il, const pi_ffn_part & p, int64_t n, pi_ffn_part & out) {
    char name[GGML_MAX_NAME];
    auto find = [&](const char * w) {
        snprintf(name, sizeof(name), "ffn_pi_prefetch_%s-%d", w, il);
        return ggml_graph_get_tensor(g.gf, name);
    };
    ggml_tensor * gate = find("gate");
    if (gate == nullptr || gate->ne[1] != n || (gate->src[0] != p.gate && gate->src[0]->view_src != p.gate)) {
        return false;
    }
    out = { gate, find("up"), find("down"), nullptr, p.r0 };
    return true;
}

// A part's dense FFN on the GPU with its rows in CPU memory, LLAMA_PI_GPU_CHUNK_ROWS rows at a
// time, the chunks' sums added. Where the GPU reads the rows in place, a chunk's rows come over on
// the GPU's copy stream while the GEMMs of the chunk before run: in the graph's order (which the
// GPU runs and ggml-alloc plans memory by) chunk k+1's copies come before chunk k's GEMMs, so two
// chunks' staging are alive at once; the last chunk's GEMMs come after the next layer's first
// chunk is asked for (pi_prefetch_next; `next`: that layer, null for none). Otherwise the
// scheduler copies each chunk's rows before its GEMMs.
static ggml_tensor * pi_build_dense_gpu_part(const llm_graph_context & g, ggml_tensor * cur, const pi_ffn_part & p,
                                             ggml_tensor * score, const llama_layer & layer, int il, ggml_backend_t gpu,
                                             const llama_layer * next) {
    const int64_t n_rows = p.gate->ne[1];
    const bool in_place = pi_gpu_reads_in_place(gpu, p.gate);
    const pi_selection sel = pi_select(g, score, p.threshold, il, gpu, in_place);
    auto select_chunk = [&](int64_t c0) {
        const int64_t n = std::min(LLAMA_PI_GPU_CHUNK_ROWS, n_rows - c0);
        const bool all = c0 == 0 && n == n_rows;
        const pi_selection chunk_sel = all ? sel : pi_selection_rows(g.ctx0, sel, c0, n);
        pi_ffn_part prefetched = p;
        if (c0 == 0 && in_place && pi_prefetched(g, il, p, n, prefetched)) {
            return pi_dense_rows{ prefetched, chunk_sel.mask, true };
        }
        const pi_bring bring = in_place ? pi_bring_chunk(layer, p, c0 / LLAMA_PI_GPU_CHUNK_ROWS, cur->ne[1]) : PI_BRING_BY_SCHEDULER;
        pi_dense_rows r = pi_bring_rows(g, all ? p : pi_part_rows(g.ctx0, p, c0, n), chunk_sel, il, gpu, bring);
        if (r.async) {
            ggml_build_forward_expand(g.gf, r.p.gate);
            ggml_build_forward_expand(g.gf, r.p.up);
            ggml_build_forward_expand(g.gf, r.p.down_t);
        }
        return r;
    };
    // in place: the next chunk's rows are asked for before this one's GEMMs
    ggml_tensor * out = nullptr;
    pi_dense_rows next_rows = in_place ? select_chunk(0) : pi_dense_rows{};
    for (int64_t c0 = 0; c0 < n_rows; c0 += LLAMA_PI_GPU_CHUNK_ROWS) {
        const pi_dense_rows rows = in_place ? next_rows : select_chunk(c0);
        if (in_place && c0 + LLAMA_PI_GPU_CHUNK_ROWS < n_rows) {
            next_rows = select_chunk(c0 + LLAMA_PI_GPU_CHUNK_ROWS);
        } else if (in_place && next != nullptr) {
            pi_prefetch_next(g, *next, il + 1, cur, gpu);
        }
        ggml_tensor * chunk_out = pi_dense_ffn(g, cur, rows, layer, il, gpu);
        if (out) {
            out = ggml_add(g.ctx0, out, chunk_out);
            ggml_backend_sched_set_tensor_backend(g.sched, out, gpu);
        } else {
            out = chunk_out;
        }
        if (in_place) {
            ggml_build_forward_expand(g.gf, out);
        }
    }
    return out;
}

uint32_t llama_pi_graph_extra_nodes(const llama_model & model) {
    const llama_hparams & hp = model.hparams;
    if (!hp.pi.sparse) {
        return 0;
    }
    uint32_t res = 0;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        const int64_t n_chunks = (hp.n_ff(il) + LLAMA_PI_GPU_CHUNK_ROWS - 1) / LLAMA_PI_GPU_CHUNK_ROWS + 1; // + the hot part
        res += (uint32_t) (40 * n_chunks);
    }
    return res;
}

// The predictor, score = fc2 . act(fc1 . x), run once where the layer runs
static ggml_tensor * pi_build_score(const llm_graph_context & g, ggml_tensor * cur, const llama_layer & layer, int il) {
    ggml_tensor * z = ggml_mul_mat(g.ctx0, layer.pi.pred_fc1, cur);
    if (g.hparams.pi.pred_relu) {
        z = ggml_relu(g.ctx0, z);
    }
    ggml_tensor * score = ggml_mul_mat(g.ctx0, layer.pi.pred_fc2, z);
    g.cb(score, "ffn_pi_score", il);
    return score;
}

static uint32_t pi_op_flags(const llama_pi_hparams & pi) {
    return (pi.rt_all_active ? GGML_PI_SPARSE_ALL_ACTIVE : 0) |
           (pi.rt_way == LLAMA_PI_WAY_PAIRS ? GGML_PI_SPARSE_PAIRS : 0) |
           (pi.rt_way == LLAMA_PI_WAY_TILES ? GGML_PI_SPARSE_TILES : 0);
}

// The FFN of a sparse file: each part (a split layer: hot rows, then cold rows) its own way, the
// parts' sums added. With all_active every row is computed, predictor skipped.
static ggml_tensor * pi_build_sparse_file_ffn(const llm_graph_context & g, ggml_tensor * cur, const llama_model & model, int il) {
    const llama_layer & layer = model.layers[il];
    ggml_context * ctx0 = g.ctx0;
    const llama_pi_hparams & pi = g.hparams.pi;
    const int64_t n_tokens = cur->ne[1];
    const std::vector<pi_ffn_part> parts = pi_layer_parts(layer);
    const bool predicted = pi.rt_sparse && !pi.rt_all_active;
    ggml_tensor * score = predicted ? pi_build_score(g, cur, layer, il) : nullptr;
    const ggml_pi_act act = pi.ffn_act == LLAMA_PI_ACT_DRELU ? GGML_PI_ACT_DRELU : GGML_PI_ACT_RELU;
    ggml_tensor * out = nullptr;
    for (const pi_ffn_part & p : parts) {
        const int64_t n_rows = p.gate->ne[1];
        ggml_tensor * part_score = score == nullptr || parts.size() == 1 ? score :
            ggml_view_2d(ctx0, score, n_rows, n_tokens, score->nb[1], p.r0 * sizeof(float));
        ggml_backend_t gpu = nullptr;
        const pi_way way = pi_choose_way(g, p, cur, gpu);
        ggml_tensor * part_out;
        if (way == PI_WAY_SPARSE) {
            part_out = ggml_pi_sparse_ffn(ctx0, cur, p.gate, p.up, p.down_t, part_score,
                                          score ? p.threshold : nullptr, act, pi_op_flags(pi),
                                          p.r0 == 0 ? layer.pi.counters : layer.pi.counters_cold);
            g.cb(part_out, "ffn_pi_sparse", il);
        } else if (way == PI_WAY_DENSE_GPU) {
            const bool last = &p == &parts.back() && il + 1 < (int) g.hparams.n_layer();
            part_out = pi_build_dense_gpu_part(g, cur, p, part_score, layer, il, gpu, last ? &model.layers[il + 1] : nullptr);
        } else {
            part_out = pi_build_dense_part(g, cur, p, part_score, layer, il);
        }
        out = out ? ggml_add(ctx0, out, part_out) : part_out;
    }
    return out;
}

ggml_tensor * llama_pi_build_ffn(const llm_graph_context & g, ggml_tensor * cur, const llama_model & model, int il) {
    const llama_layer & layer = model.layers[il];
    if (layer.pi.ffn_down_t) {
        return pi_build_sparse_file_ffn(g, cur, model, il);
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
