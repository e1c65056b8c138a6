// powerinfer_gguf: GGML_OP_PI_SPARSE_FFN on every backend that claims it, against a reference built
// from ggml primitives on the CPU (mul_mat, relu, mul, step): the kernels are never compared with
// themselves. Row types F32/F16/BF16 and Q8_0/Q4_0/Q4_K/Q6_K (what pi-quantize writes), decode
// and ubatches, ReLU and dReLU, sparse and all-active, row counts and widths off the kernels' block
// sizes, 1-4 CPU threads. Also checks the op's counters: rows predicted exactly, rows fired within
// the few that a gate within rounding of zero may flip. And GGML_OP_PI_GATHER_ROWS on every backend,
// its weight where the graph puts it (a GPU's pinned host memory, read in place): kept rows equal
// byte for byte, the others zero.
//
//   test-pi-sparse-ffn [-v]     exit status 0 when every case passes
//   test-pi-sparse-ffn --perf   on each GPU: the gather reading a 13B-shape weight from the device's
//                               host buffer, kept shares 1 to 0.25, against copying the whole weight
//                               over (what the scheduler does without the gather): the crossover
//                               between the two is the share below which gathering wins; then
//                               the dense GPU way's steps on one chunk of a 13B layer (4096 rows,
//                               a 512-token ubatch, all in GPU memory): where its time goes;
//                               then a 13B layer's chunks, gathered in order or on the copy stream
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-powerinfer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct pi_case {
    ggml_type type;
    int64_t   n_embd, n_rows, n_tok;
    float     active; // share of (row, token) scores above the threshold; < 0: all active
    bool      drelu;
    uint32_t  way = 0; // GGML_PI_SPARSE_PAIRS, GGML_PI_SPARSE_TILES, or 0: the kernel's choice
};

struct pi_inputs {
    std::vector<float> x, gate, up, down, score, thr; // F32 values; rows converted to the case's type on upload
};

pi_inputs pi_draw(const pi_case & c, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> w(-1.0f, 1.0f);
    std::bernoulli_distribution on(c.active < 0 ? 1.0 : c.active);
    pi_inputs in;
    auto fill = [&](std::vector<float> & v, size_t n, float scale) {
        v.resize(n);
        for (float & e : v) {
            e = scale * w(rng);
        }
    };
    fill(in.x, c.n_embd * c.n_tok, 1.0f);
    fill(in.gate, c.n_embd * c.n_rows, 0.1f);
    fill(in.up, c.n_embd * c.n_rows, 0.1f);
    fill(in.down, c.n_embd * c.n_rows, 0.1f);
    in.thr.assign(c.n_rows, 0.5f);
    in.score.resize(c.n_rows * c.n_tok);
    for (float & s : in.score) {
        s = on(rng) ? 1.0f : 0.0f;
    }
    return in;
}

void pi_upload(ggml_tensor * t, const std::vector<float> & v) {
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_set(t, v.data(), 0, ggml_nbytes(t));
        return;
    }
    std::vector<uint8_t> buf(ggml_nbytes(t));
    ggml_quantize_chunk(t->type, v.data(), buf.data(), 0, t->ne[1], t->ne[0], nullptr);
    ggml_backend_tensor_set(t, buf.data(), 0, buf.size());
}

struct pi_graph {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_cgraph * gf = nullptr;
    ggml_tensor * out = nullptr;
    ggml_tensor * h = nullptr; // the reference's activations
    ~pi_graph() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
};

// The case's tensors in ctx; the op (reference = false) or its definition in primitives.
// With `stats`, the op's counters are a tensor named "stats" of the case.
ggml_tensor * pi_build(ggml_context * ctx, const pi_case & c, bool reference, bool stats, ggml_tensor ** h_out) {
    ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.n_embd, c.n_tok);
    ggml_tensor * gate   = ggml_new_tensor_2d(ctx, c.type, c.n_embd, c.n_rows);
    ggml_tensor * up     = ggml_new_tensor_2d(ctx, c.type, c.n_embd, c.n_rows);
    ggml_tensor * down_t = ggml_new_tensor_2d(ctx, c.type, c.n_embd, c.n_rows);
    ggml_tensor * score  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.n_rows, c.n_tok);
    ggml_tensor * thr    = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.n_rows);
    ggml_tensor * inputs[]     = { x, gate, up, down_t, score, thr };
    const char *  input_names[] = { "x", "gate", "up", "down_t", "score", "thr" };
    for (int i = 0; i < 6; ++i) {
        ggml_set_name(inputs[i], input_names[i]);
        ggml_set_input(inputs[i]);
    }
    const bool all = c.active < 0;
    if (!reference) {
        ggml_tensor * counters = nullptr;
        if (stats) {
            counters = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, GGML_PI_N_STATS);
            ggml_set_name(counters, "stats");
            ggml_set_input(counters);
        }
        return ggml_pi_sparse_ffn(ctx, x, gate, up, down_t, all ? nullptr : score, all ? nullptr : thr,
                                  c.drelu ? GGML_PI_ACT_DRELU : GGML_PI_ACT_RELU,
                                  (all ? GGML_PI_SPARSE_ALL_ACTIVE : 0) | c.way, counters);
    }
    // h = relu(gate x) * up x (dReLU: both rectified), where score > threshold; out = down_t^T h
    ggml_tensor * g = ggml_mul_mat(ctx, gate, x);
    ggml_tensor * u = ggml_mul_mat(ctx, up, x);
    ggml_tensor * h = ggml_mul(ctx, ggml_relu(ctx, g), c.drelu ? ggml_relu(ctx, u) : u);
    if (!all) {
        h = ggml_mul(ctx, h, ggml_step(ctx, ggml_sub(ctx, score, thr)));
    }
    ggml_set_output(h);
    *h_out = h;
    ggml_tensor * down = ggml_cont(ctx, ggml_transpose(ctx, ggml_cast(ctx, down_t, GGML_TYPE_F32)));
    return ggml_mul_mat(ctx, down, h);
}

bool pi_run(ggml_backend_t backend, const pi_case & c, const pi_inputs & in, bool reference, ggml_pi_sparse_stats * stats,
            std::vector<float> & out, std::vector<float> * h) {
    pi_graph g;
    ggml_init_params ip = { ggml_tensor_overhead() * 64 + ggml_graph_overhead(), nullptr, true };
    g.ctx = ggml_init(ip);
    g.out = pi_build(g.ctx, c, reference, stats != nullptr, &g.h);
    ggml_set_output(g.out);
    if (!reference && !ggml_backend_supports_op(backend, g.out)) {
        return false;
    }
    g.gf = ggml_new_graph(g.ctx);
    ggml_build_forward_expand(g.gf, g.out);
    g.buf = ggml_backend_alloc_ctx_tensors(g.ctx, backend);
    pi_upload(ggml_get_tensor(g.ctx, "x"), in.x);
    pi_upload(ggml_get_tensor(g.ctx, "gate"), in.gate);
    pi_upload(ggml_get_tensor(g.ctx, "up"), in.up);
    pi_upload(ggml_get_tensor(g.ctx, "down_t"), in.down);
    pi_upload(ggml_get_tensor(g.ctx, "score"), in.score);
    pi_upload(ggml_get_tensor(g.ctx, "thr"), in.thr);
    ggml_tensor * counters = ggml_get_tensor(g.ctx, "stats");
    if (counters) {
        ggml_backend_tensor_memset(counters, 0, 0, ggml_nbytes(counters));
    }
    if (ggml_backend_graph_compute(backend, g.gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        return false;
    }
    if (counters) { // read back as any backend's (or an RPC server's) counters are
        ggml_backend_tensor_get(counters, stats, 0, ggml_nbytes(counters));
    }
    out.resize(ggml_nelements(g.out));
    ggml_backend_tensor_get(g.out, out.data(), 0, ggml_nbytes(g.out));
    if (h) {
        h->resize(ggml_nelements(g.h));
        ggml_backend_tensor_get(g.h, h->data(), 0, ggml_nbytes(g.h));
    }
    return true;
}

double pi_nmse(const std::vector<float> & a, const std::vector<float> & ref) {
    double err = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        err  += (double) (a[i] - ref[i]) * (a[i] - ref[i]);
        norm += (double) ref[i] * ref[i];
    }
    return norm > 0 ? err / norm : err;
}

// The CPU kernel's pairs round x to the rows' dot-product type as ggml's mul_mat does: only the
// order of additions differs (~1e-13 measured). Its tiles and other backends' kernels keep x in
// F32: 16-bit and quantized rows then differ by x's rounding.
double pi_max_nmse(ggml_type t, bool rounds_x) {
    return rounds_x || t == GGML_TYPE_F32 ? 1e-9 : 5e-4;
}

bool pi_tiles_type(ggml_type t) {
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
}

// whether the CPU kernel takes tiles (ggml-powerinfer.h): from the union of selected rows
bool pi_expect_tiles(const pi_case & c, const pi_inputs & in, int64_t n_pred) {
    if (!pi_tiles_type(c.type) || c.way == GGML_PI_SPARSE_PAIRS) {
        return false;
    }
    if (c.way == GGML_PI_SPARSE_TILES) {
        return true;
    }
    int64_t n_union = 0;
    for (int64_t j = 0; j < c.n_rows; ++j) {
        bool any = c.active < 0;
        for (int64_t t = 0; t < c.n_tok && !any; ++t) {
            any = in.score[t * c.n_rows + j] > in.thr[j];
        }
        n_union += any;
    }
    return c.n_tok >= GGML_PI_TILE_MIN_TOKENS && (double) n_pred * GGML_PI_TILE_GAIN >= (double) n_union * c.n_tok;
}

std::string pi_name(const pi_case & c) {
    char buf[160];
    snprintf(buf, sizeof(buf), "type=%s n_embd=%lld n_rows=%lld n_tok=%lld active=%s act=%s way=%s", ggml_type_name(c.type),
             (long long) c.n_embd, (long long) c.n_rows, (long long) c.n_tok,
             c.active < 0 ? "all" : std::to_string(c.active).substr(0, 4).c_str(), c.drelu ? "drelu" : "relu",
             c.way == GGML_PI_SPARSE_PAIRS ? "pairs" : c.way == GGML_PI_SPARSE_TILES ? "tiles" : "auto");
    return buf;
}

std::vector<pi_case> pi_cases() {
    std::vector<pi_case> cases;
    for (ggml_type t : { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K }) {
        for (int64_t n_embd : { 256, 268 }) { // 268 = 16 x 16 + 8 + 4: AVX-512 loop, AVX2 remainder, scalar tail
            if (n_embd % ggml_blck_size(t) != 0) {
                continue;
            }
            for (int64_t n_tok : { 1, 3, 9, 40 }) {
                // 0.03 x 40 tokens: the union is most rows, the pairs few (auto takes pairs)
                for (float active : { 0.03f, 0.1f, 0.5f, -1.0f }) {
                    for (bool drelu : { false, true }) {
                        for (uint32_t way : { 0u, (uint32_t) GGML_PI_SPARSE_PAIRS, (uint32_t) GGML_PI_SPARSE_TILES }) {
                            if (way != 0 && !pi_tiles_type(t)) {
                                continue; // one way only
                            }
                            cases.push_back({ t, n_embd, n_tok == 40 ? 100 : 520, n_tok, active, drelu, way });
                        }
                    }
                }
            }
        }
    }
    return cases;
}

} // namespace

// Rows [r0, r0 + n_rows) of a weight of F16 / Q4_0 rows, gathered by `backend` with the weight in
// its device's host buffer where it has one (as the graph does), else in the backend's memory;
// `async`: on the copy stream, then copied on the compute stream after ggml_pi_gathered (a wait
// that does not hold would copy rows not yet there). Returns whether the kept rows came back byte
// for byte and the others as zeros.
bool pi_check_gather(ggml_backend_t backend, ggml_type type, int64_t n_embd, int64_t n_rows, int64_t r0, bool async,
                     uint32_t seed) {
    ggml_init_params ip = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx_w = ggml_init(ip);
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = ggml_new_tensor_2d(ctx_w, type, n_embd, r0 + n_rows);
    ggml_tensor * count = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_rows);
    ggml_tensor * rows = ggml_view_2d(ctx, w, n_embd, n_rows, w->nb[1], r0 * w->nb[1]);
    ggml_tensor * out = async ? ggml_cont(ctx, ggml_pi_gathered(ctx, ggml_pi_gather_rows_async(ctx, rows, count))) :
                                ggml_pi_gather_rows(ctx, rows, count);
    bool ok = ggml_backend_supports_op(backend, async ? out->src[0]->src[0] : out) && ggml_backend_supports_op(backend, out);
    ggml_backend_buffer_type_t host = ggml_backend_dev_host_buffer_type(ggml_backend_get_device(backend));
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, host ? host : ggml_backend_get_default_buffer_type(backend));
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    if (ok) {
        std::mt19937 rng(seed);
        std::vector<uint8_t> wb(ggml_nbytes(w));
        for (uint8_t & b : wb) {
            b = (uint8_t) (rng() & 0x3f); // small bytes: never a NaN / Inf pattern
        }
        std::vector<float> cnt(n_rows);
        for (float & v : cnt) {
            v = (float) (rng() % 3); // 0: dropped
        }
        ggml_backend_tensor_set(w, wb.data(), 0, wb.size());
        ggml_backend_tensor_set(count, cnt.data(), 0, ggml_nbytes(count));
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        ok = ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS;
        std::vector<uint8_t> got(ggml_nbytes(out));
        ggml_backend_tensor_get(out, got.data(), 0, got.size());
        const size_t row_b = ggml_row_size(type, n_embd);
        for (int64_t r = 0; ok && r < n_rows; ++r) {
            for (size_t i = 0; i < row_b; ++i) {
                ok &= got[r * row_b + i] == (cnt[r] > 0 ? wb[(r0 + r) * row_b + i] : 0);
            }
        }
    }
    ggml_backend_buffer_free(buf);
    ggml_backend_buffer_free(buf_w);
    ggml_free(ctx);
    ggml_free(ctx_w);
    return ok;
}

// Seconds per run of fn, best of `reps` after one warm-up run
template <typename F>
double pi_best_seconds(ggml_backend_t be, int reps, F fn) {
    double best = 1e30;
    for (int r = 0; r <= reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        ggml_backend_synchronize(be);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = r ? std::min(best, s) : best;
    }
    return best;
}

void pi_perf_gather(ggml_backend_t be) {
    ggml_backend_buffer_type_t host = ggml_backend_dev_host_buffer_type(ggml_backend_get_device(be));
    if (host == nullptr) {
        return;
    }
    const int64_t n_embd = 5120, n_rows = 13824; // a 13B layer's gate, F16: 141.6 MB
    ggml_init_params ip = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx_w = ggml_init(ip);
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = ggml_new_tensor_2d(ctx_w, GGML_TYPE_F16, n_embd, n_rows);
    ggml_tensor * count = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_rows);
    ggml_tensor * w_dev = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_embd, n_rows);
    ggml_tensor * out = ggml_pi_gather_rows(ctx, w, count);
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, host);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    std::vector<uint16_t> ones(ggml_nelements(w), 0x3c00); // 1.0 in F16
    ggml_backend_tensor_set(w, ones.data(), 0, ggml_nbytes(w));
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    const double gb = ggml_nbytes(w) / 1e9;
    const double t_copy = pi_best_seconds(be, 5, [&] { ggml_backend_tensor_copy(w, w_dev); });
    printf("%s: copy of the whole weight (%.3f GB): %.2f ms, %.1f GB/s\n", ggml_backend_name(be), gb, t_copy * 1e3, gb / t_copy);
    std::mt19937 rng(7);
    for (double share : { 1.0, 0.9, 0.76, 0.5, 0.25 }) {
        std::bernoulli_distribution on(share);
        std::vector<float> cnt(n_rows);
        for (float & v : cnt) {
            v = on(rng) ? 1.0f : 0.0f;
        }
        ggml_backend_tensor_set(count, cnt.data(), 0, ggml_nbytes(count));
        const double t = pi_best_seconds(be, 5, [&] { ggml_backend_graph_compute(be, gf); });
        printf("%s: gather of %.0f%% of rows: %.2f ms, %.1f GB/s of rows kept, %.2fx the copy's time\n",
               ggml_backend_name(be), 100 * share, t * 1e3, share * gb / t, t / t_copy);
    }
    ggml_backend_buffer_free(buf);
    ggml_backend_buffer_free(buf_w);
    ggml_free(ctx);
    ggml_free(ctx_w);
}

// Time of one graph node on `be` (its inputs already there), best of 5 after a warm-up
static double pi_node_seconds(ggml_backend_t be, ggml_context * ctx, ggml_tensor * node) {
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, node);
    return pi_best_seconds(be, 5, [&] { ggml_backend_graph_compute(be, gf); });
}

// The dense GPU way on one chunk (llama-powerinfer-graph.cpp, pi_build_dense_part): gate and up
// GEMMs and the row-per-neuron down as one out_prod over the rows as stored; against the way it
// replaced (down_t copied transposed, then mul_mat) and the down GEMM on a down stored as stock
// stores it
void pi_perf_dense_chunk(ggml_backend_t be) {
    const int64_t n_embd = 5120, n_rows = 4096, n_tok = 512;
    ggml_init_params ip = { ggml_tensor_overhead() * 32 + ggml_graph_overhead() * 8, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * gate = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_embd, n_rows);
    ggml_tensor * down_t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_embd, n_rows);
    ggml_tensor * down = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_rows, n_embd); // stock's layout
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
    ggml_tensor * h = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rows, n_tok);
    ggml_tensor * up_gemm = ggml_mul_mat(ctx, gate, x);
    ggml_tensor * transposed = ggml_cont(ctx, ggml_transpose(ctx, down_t));
    ggml_tensor * down_gemm = ggml_mul_mat(ctx, down, h);
    ggml_tensor * down_op = ggml_out_prod(ctx, down_t, ggml_transpose(ctx, h));
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    ggml_backend_buffer_clear(buf, 0);
    const double t_gemm = pi_node_seconds(be, ctx, up_gemm);
    const double t_tr = pi_node_seconds(be, ctx, transposed);
    const double t_down = pi_node_seconds(be, ctx, down_gemm);
    const double t_op = ggml_backend_supports_op(be, down_op) ? pi_node_seconds(be, ctx, down_op) : NAN;
    printf("%s: dense GPU way, one chunk (%lld rows, %lld tokens): gate or up GEMM %.3f ms; down as out_prod "
           "%.3f ms; the way before: down_t transposed copy %.3f ms + down GEMM %.3f ms (stock's down)\n",
           ggml_backend_name(be), (long long) n_rows, (long long) n_tok, t_gemm * 1e3, t_op * 1e3, t_tr * 1e3,
           t_down * 1e3);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
}

// A 13B layer's FFN over a 512-token ubatch, every row in the GPU's host buffer and every row
// kept (what a 512-token ubatch selects at 13B), as the dense GPU way builds it
// (llama-powerinfer-graph.cpp): chunks of 2048 rows, each brought over then multiplied. Ways: the
// gathers in order (each chunk's right before its GEMMs); on the copy stream during the GEMMs of
// the chunk before; the same with every row copied by the copy engine (no count). Memory planned
// by ggml-alloc as llama.cpp's graphs are (it hands freed memory on); sums checked against the
// in-order way's.
void pi_perf_layer_pipeline(ggml_backend_t be) {
    ggml_backend_buffer_type_t host = ggml_backend_dev_host_buffer_type(ggml_backend_get_device(be));
    if (host == nullptr) {
        return;
    }
    const int64_t n_embd = 5120, n_ff = 13824, n_tok = 512, chunk = 2048; // LLAMA_PI_GPU_CHUNK_ROWS
    ggml_init_params ip_w = { ggml_tensor_overhead() * 4, nullptr, true };
    ggml_context * ctx_w = ggml_init(ip_w);
    ggml_tensor * gate = ggml_new_tensor_2d(ctx_w, GGML_TYPE_F16, n_embd, n_ff);
    ggml_tensor * up = ggml_new_tensor_2d(ctx_w, GGML_TYPE_F16, n_embd, n_ff);
    ggml_tensor * down_t = ggml_new_tensor_2d(ctx_w, GGML_TYPE_F16, n_embd, n_ff);
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, host);
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-0.05f, 0.05f);
    for (ggml_tensor * w : { gate, up, down_t }) {
        std::vector<ggml_fp16_t> v(ggml_nelements(w));
        for (ggml_fp16_t & e : v) {
            e = ggml_fp32_to_fp16(u(rng));
        }
        ggml_backend_tensor_set(w, v.data(), 0, ggml_nbytes(w));
    }
    std::vector<float> xs(n_embd * n_tok), ones(n_ff, 1.0f), ref;
    for (float & e : xs) {
        e = u(rng) * 20;
    }
    const double gb = 3.0 * ggml_nbytes(gate) / 1e9;
    const char * names[] = { "gathered in order", "gathered on the copy stream", "copied whole on the copy stream" };
    double t_in_order = 0;
    for (int way = 0; way < 3; ++way) {
        const bool async = way > 0;
        ggml_init_params ip = { ggml_tensor_overhead() * 256 + ggml_graph_overhead(), nullptr, true };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
        ggml_tensor * count = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_ff);
        ggml_set_input(x);
        ggml_set_input(count);
        ggml_set_output(x); // kept across runs: ggml-alloc would hand their memory on after their last reader
        ggml_set_output(count);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        auto select = [&](int64_t c0) { // gate, up, down_t of a chunk, brought over
            const int64_t n = std::min(chunk, n_ff - c0);
            ggml_tensor * c = way == 2 ? nullptr : ggml_view_1d(ctx, count, n, c0 * sizeof(float));
            std::vector<ggml_tensor *> g;
            for (ggml_tensor * w : { gate, up, down_t }) {
                ggml_tensor * rows = ggml_view_2d(ctx, w, n_embd, n, w->nb[1], c0 * w->nb[1]);
                g.push_back(async ? ggml_pi_gather_rows_async(ctx, rows, c) : ggml_pi_gather_rows(ctx, rows, c));
                ggml_build_forward_expand(gf, g.back());
            }
            return g;
        };
        ggml_tensor * out = nullptr;
        std::vector<ggml_tensor *> next = select(0);
        for (int64_t c0 = 0; c0 < n_ff; c0 += chunk) {
            std::vector<ggml_tensor *> g = async || c0 == 0 ? next : select(c0);
            if (async && c0 + chunk < n_ff) {
                next = select(c0 + chunk);
            }
            for (ggml_tensor *& t : g) {
                t = async ? ggml_pi_gathered(ctx, t) : t;
            }
            ggml_tensor * h = ggml_mul(ctx, ggml_relu(ctx, ggml_mul_mat(ctx, g[0], x)), ggml_mul_mat(ctx, g[1], x));
            ggml_tensor * o = ggml_out_prod(ctx, g[2], ggml_transpose(ctx, h));
            out = out ? ggml_add(ctx, out, o) : o;
            ggml_build_forward_expand(gf, out);
        }
        ggml_set_output(out);
        ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
        if (!ggml_backend_supports_op(be, out->src[1]) || !ggml_gallocr_alloc_graph(galloc, gf)) {
            printf("%s: layer pipeline: not supported\n", ggml_backend_name(be));
        } else {
            ggml_backend_tensor_set(x, xs.data(), 0, ggml_nbytes(x));
            if (way != 2) {
                ggml_backend_tensor_set(count, ones.data(), 0, ggml_nbytes(count));
            }
            const double t = pi_best_seconds(be, 3, [&] { ggml_backend_graph_compute(be, gf); });
            std::vector<float> got(ggml_nelements(out));
            ggml_backend_tensor_get(out, got.data(), 0, ggml_nbytes(out));
            if (way == 0) {
                ref = got;
                t_in_order = t;
            }
            const double err = pi_nmse(got, ref);
            printf("%s: a 13B layer's FFN, 512 tokens, every row from host memory (%.3f GB), %s: %.2f ms "
                   "(%.1f GB/s of rows), %.2fx in order's time; nmse against in order %.2g %s\n", ggml_backend_name(be), gb,
                   names[way], t * 1e3, gb / t, t / t_in_order, err, err < 1e-6 ? "ok" : "FAIL");
        }
        ggml_gallocr_free(galloc);
        ggml_free(ctx);
    }
    ggml_backend_buffer_free(buf_w);
    ggml_free(ctx_w);
}

int main(int argc, char ** argv) {
    const bool verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    if (argc > 1 && strcmp(argv[1], "--perf") == 0) {
        ggml_backend_load_all();
        for (size_t d = 0; d < ggml_backend_dev_count(); ++d) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(d);
            if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
                ggml_backend_t be = ggml_backend_dev_init(dev, nullptr);
                pi_perf_gather(be);
                pi_perf_dense_chunk(be);
                pi_perf_layer_pipeline(be);
                ggml_backend_free(be);
            }
        }
        return 0;
    }
    ggml_backend_load_all();
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (cpu == nullptr) {
        fprintf(stderr, "no CPU backend\n");
        return 1;
    }
    int n_fail = 0, n_run = 0;
    uint32_t seed = 1;
    for (const pi_case & c : pi_cases()) {
        const pi_inputs in = pi_draw(c, seed++);
        std::vector<float> ref, h;
        ggml_backend_cpu_set_n_threads(cpu, 1);
        pi_run(cpu, c, in, true, nullptr, ref, &h);
        int64_t n_pred = 0, n_fired = 0;
        for (size_t i = 0; i < in.score.size(); ++i) {
            n_pred += c.active < 0 || in.score[i] > in.thr[i % c.n_rows];
            n_fired += h[i] != 0.0f;
        }
        for (size_t d = 0; d < ggml_backend_dev_count(); ++d) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(d);
            const bool is_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
            if (!is_cpu && c.way != 0) {
                continue; // the forced ways are the CPU kernel's
            }
            ggml_backend_t be = is_cpu ? cpu : ggml_backend_dev_init(dev, nullptr);
            if (be == nullptr) {
                continue;
            }
            for (int nt : is_cpu ? std::vector<int>{ 1, 2, 3, 4 } : std::vector<int>{ 0 }) {
                if (is_cpu) {
                    ggml_backend_cpu_set_n_threads(cpu, nt);
                }
                ggml_pi_sparse_stats stats = {};
                std::vector<float> out;
                if (!pi_run(be, c, in, false, is_cpu ? &stats : nullptr, out, nullptr)) {
                    continue; // the backend does not claim this case
                }
                ++n_run;
                const double err = pi_nmse(out, ref);
                const bool tiles = is_cpu && pi_expect_tiles(c, in, n_pred);
                const double max_err = pi_max_nmse(c.type, is_cpu && !tiles);
                bool ok = err <= max_err;
                std::string why;
                if (is_cpu && stats.n_evals_tiles != (tiles ? 1 : 0)) {
                    ok = false;
                    why += std::string(" took ") + (stats.n_evals_tiles ? "tiles" : "pairs");
                }
                if (is_cpu && stats.n_predicted != n_pred) {
                    ok = false;
                    why += " predicted " + std::to_string(stats.n_predicted) + " != " + std::to_string(n_pred);
                }
                // a gate within rounding of zero may fire in one and not the other
                if (is_cpu && std::llabs(stats.n_fired - n_fired) > 2 + n_fired / 100) {
                    ok = false;
                    why += " fired " + std::to_string(stats.n_fired) + " vs " + std::to_string(n_fired);
                }
                if (!ok || verbose) {
                    printf("%s %s threads=%d %s: nmse %.3g (max %.1g)%s%s\n", ok ? "ok  " : "FAIL", ggml_backend_name(be), nt,
                           pi_name(c).c_str(), err, max_err, tiles ? " tiles" : "", why.c_str());
                }
                n_fail += !ok;
            }
            if (!is_cpu) {
                ggml_backend_free(be);
            }
        }
    }
    for (size_t d = 0; d < ggml_backend_dev_count(); ++d) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(d);
        const bool is_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        ggml_backend_t be = is_cpu ? cpu : ggml_backend_dev_init(dev, nullptr);
        if (be == nullptr) {
            continue;
        }
        // F16 rows of 16-byte multiples and not (4-byte loads, 1-byte loads), Q4_0 blocks of 18 bytes
        const struct { ggml_type type; int64_t n_embd; } shapes[] = {
            { GGML_TYPE_F16, 4096 }, { GGML_TYPE_F16, 258 }, { GGML_TYPE_F16, 255 }, { GGML_TYPE_Q4_0, 512 } };
        for (const auto & sh : shapes) {
            for (int64_t r0 : { 0, 37 }) {
                for (bool async : { false, true }) {
                    const bool ok = pi_check_gather(be, sh.type, sh.n_embd, 300, r0, async, seed++);
                    if (!ok || verbose) {
                        printf("%s %s gather_rows%s %s n_embd=%lld r0=%lld\n", ok ? "ok  " : "FAIL", ggml_backend_name(be),
                               async ? " async" : "", ggml_type_name(sh.type), (long long) sh.n_embd, (long long) r0);
                    }
                    ++n_run;
                    n_fail += !ok;
                }
            }
        }
        if (!is_cpu) {
            ggml_backend_free(be);
        }
    }
    ggml_backend_free(cpu);
    printf("%d of %d runs passed\n", n_run - n_fail, n_run);
    return n_fail == 0 && n_run > 0 ? 0 : 1;
}
