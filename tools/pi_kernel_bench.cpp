// GB/s of FFN rows actually read by the sparse CPU kernel (GGML_OP_PI_SPARSE_FFN), against dense
// streaming through ggml's own mat-vec on the same weights and threads (tools/kernel-bench.sh builds
// and runs it against the patched libggml).
//
// One token through n_layer ReGLU FFNs (F16 or F32 rows): a fresh random set of active neurons per
// layer and repetition (drawn outside the timed region, like ../shared/MEASURED.md's probe), every
// active neuron fires (gate rows and x positive), so each costs a gate, an up and a down row read.
//
//   pi_kernel_bench n_embd n_ff n_layer threads reps share [share...]   (share 1 = every row)
// PI_BENCH_HUGEPAGES=1 asks for 2 MB pages on the weights (madvise) before they are first touched.
// PI_BENCH_FIRE=f (0 < f <= 1, default 1): only a share f of the neurons fire when computed (the
// others get negative gate rows), as in a real decode where the predictor's precision is ~0.66: a
// neuron that does not fire costs its gate row alone. Bytes counted are the rows actually read.
#include "ggml.h"
#include "ggml-cpu.h"
#include "ggml-powerinfer.h"

#include <algorithm>
#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

struct layer_w {
    ggml_tensor * gate, * up, * down_t, * score, * thr;
};

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void fill_f16(ggml_tensor * t, float v) {
    ggml_fp16_t h = ggml_fp32_to_fp16(v);
    auto * p = (ggml_fp16_t *) t->data;
    std::fill(p, p + ggml_nelements(t), h);
}

static double run(ggml_cgraph * gf, int n_threads, ggml_threadpool * tp, std::vector<uint8_t> & work) {
    ggml_cplan plan = ggml_graph_plan(gf, n_threads, tp);
    if (work.size() < plan.work_size) {
        work.resize(plan.work_size);
    }
    plan.work_data = work.data();
    const double t0 = now_s();
    if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        exit(1);
    }
    return now_s() - t0;
}

int main(int argc, char ** argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s n_embd n_ff n_layer threads reps share [share...]\n", argv[0]);
        return 2;
    }
    const int64_t n_embd = atoll(argv[1]), n_ff = atoll(argv[2]);
    const int n_layer = atoi(argv[3]), n_threads = atoi(argv[4]), reps = atoi(argv[5]);
    std::vector<double> shares;
    for (int i = 6; i < argc; ++i) {
        shares.push_back(atof(argv[i]));
    }

    const size_t row_bytes = ggml_row_size(GGML_TYPE_F16, n_embd);
    const size_t w_bytes = (size_t) n_layer * (3 * n_ff * row_bytes + 2 * n_ff * sizeof(float)) +
                           n_embd * sizeof(float);
    ggml_init_params ip = { w_bytes + 64 * ggml_tensor_overhead() * n_layer + (64 << 20), nullptr, false };
    ggml_context * wctx = ggml_init(ip);
    if (!wctx) {
        fprintf(stderr, "cannot allocate %.2f GB of weights\n", w_bytes / 1e9);
        return 1;
    }
    if (getenv("PI_BENCH_HUGEPAGES") && atoi(getenv("PI_BENCH_HUGEPAGES")) == 1) {
        const uintptr_t lo = ((uintptr_t) ggml_get_mem_buffer(wctx) + (2u << 20) - 1) & ~(uintptr_t) ((2u << 20) - 1);
        const uintptr_t hi = ((uintptr_t) ggml_get_mem_buffer(wctx) + ggml_get_mem_size(wctx)) & ~(uintptr_t) ((2u << 20) - 1);
        if (hi > lo && madvise((void *) lo, hi - lo, MADV_HUGEPAGE) != 0) {
            perror("madvise(MADV_HUGEPAGE)");
        }
    }
    const double fire = getenv("PI_BENCH_FIRE") ? atof(getenv("PI_BENCH_FIRE")) : 1.0;
    if (!(fire > 0.0 && fire <= 1.0)) {
        fprintf(stderr, "PI_BENCH_FIRE must be in (0, 1], got %s\n", getenv("PI_BENCH_FIRE"));
        return 1;
    }
    std::vector<char> fires(n_ff, 1); // the same neurons fire or not in every layer
    {
        std::mt19937_64 frng(7);
        std::uniform_real_distribution<double> u01(0.0, 1.0);
        for (auto & f : fires) {
            f = u01(frng) < fire;
        }
    }
    ggml_tensor * x = ggml_new_tensor_1d(wctx, GGML_TYPE_F32, n_embd);
    std::fill((float *) x->data, (float *) x->data + n_embd, 0.01f);
    std::vector<layer_w> L(n_layer);
    for (auto & l : L) {
        l.gate   = ggml_new_tensor_2d(wctx, GGML_TYPE_F16, n_embd, n_ff);
        l.up     = ggml_new_tensor_2d(wctx, GGML_TYPE_F16, n_embd, n_ff);
        l.down_t = ggml_new_tensor_2d(wctx, GGML_TYPE_F16, n_embd, n_ff);
        l.score  = ggml_new_tensor_1d(wctx, GGML_TYPE_F32, n_ff);
        l.thr    = ggml_new_tensor_1d(wctx, GGML_TYPE_F32, n_ff);
        fill_f16(l.gate, 0.01f);   // a computed neuron fires: gate, up and down rows all read
        for (int64_t j = 0; j < n_ff; ++j) {
            if (!fires[j]) {       // ... unless its gate row is negative: the gate row alone
                auto * row = (ggml_fp16_t *) l.gate->data + j * n_embd;
                std::fill(row, row + n_embd, ggml_fp32_to_fp16(-0.01f));
            }
        }
        fill_f16(l.up, 0.01f);
        fill_f16(l.down_t, 0.001f);
        std::fill((float *) l.thr->data, (float *) l.thr->data + n_ff, 0.5f);
    }

    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    std::vector<uint8_t> work;
    std::mt19937_64 rng(42);
    std::vector<int32_t> idx(n_ff);
    std::iota(idx.begin(), idx.end(), 0);

    const size_t gctx_size = ggml_tensor_overhead() * (16 * n_layer + 64) + ggml_graph_overhead_custom(8 * n_layer + 64, false);
    printf("| rows computed | ms/token | GB/s of rows read | share of dense GB/s |\n|---|---:|---:|---:|\n");

    // dense reference: ggml's mat-vec over the same bytes (down_t read as a [n_ff, n_embd] matrix:
    // the numbers are meaningless, the bytes and access pattern are those of a dense down projection)
    double dense_gbps = 0.0;
    {
        ggml_init_params gp = { gctx_size, nullptr, true };
        ggml_context * g = ggml_init(gp);
        ggml_cgraph * gf = ggml_new_graph_custom(g, 8 * n_layer + 64, false);
        for (auto & l : L) {
            ggml_tensor * gt = ggml_mul_mat(g, l.gate, x);
            ggml_tensor * ut = ggml_mul_mat(g, l.up, x);
            ggml_tensor * h  = ggml_mul(g, ggml_relu(g, gt), ut);
            ggml_tensor * d  = ggml_mul_mat(g, ggml_reshape_2d(g, l.down_t, n_ff, n_embd), h);
            ggml_build_forward_expand(gf, d);
        }
        // intermediate tensors need memory: allocate them in a separate context
        ggml_init_params dp = { (size_t) n_layer * (3 * n_ff + 2 * n_embd) * sizeof(float) * 2 + (16 << 20), nullptr, false };
        ggml_context * data_ctx = ggml_init(dp);
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * t = ggml_graph_node(gf, i);
            if (!t->data && t->op != GGML_OP_RESHAPE && t->op != GGML_OP_VIEW) {
                t->data = ggml_new_tensor(data_ctx, t->type, GGML_MAX_DIMS, t->ne)->data;
            }
        }
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {  // reshape views share their source data
            ggml_tensor * t = ggml_graph_node(gf, i);
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                if (t->src[s] && t->src[s]->op == GGML_OP_RESHAPE && !t->src[s]->data) {
                    t->src[s]->data = t->src[s]->src[0]->data;
                }
            }
        }
        run(gf, n_threads, tp, work); // warm-up
        double best = 1e9;
        for (int r = 0; r < reps; ++r) {
            best = std::min(best, run(gf, n_threads, tp, work));
        }
        const double bytes = (double) n_layer * 3 * n_ff * row_bytes;
        dense_gbps = bytes / best / 1e9;
        printf("| dense (ggml mat-vec) | %.2f | %.1f | 100%% |\n", best * 1e3, dense_gbps);
        ggml_free(data_ctx);
        ggml_free(g);
    }

    for (double share : shares) {
        const int64_t n_act = std::max<int64_t>(1, (int64_t) (share * n_ff));
        ggml_init_params gp = { gctx_size, nullptr, true };
        ggml_context * g = ggml_init(gp);
        ggml_cgraph * gf = ggml_new_graph_custom(g, 8 * n_layer + 64, false);
        std::vector<ggml_tensor *> outs;
        for (auto & l : L) {
            ggml_tensor * o = ggml_pi_sparse_ffn(g, ggml_reshape_2d(g, x, n_embd, 1), l.gate, l.up, l.down_t,
                                                 ggml_reshape_2d(g, l.score, n_ff, 1), l.thr,
                                                 GGML_PI_ACT_RELU, 0, nullptr);
            ggml_build_forward_expand(gf, o);
            outs.push_back(o);
        }
        ggml_init_params dp = { (size_t) n_layer * n_embd * sizeof(float) + (16 << 20), nullptr, false };
        ggml_context * data_ctx = ggml_init(dp);
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * t = ggml_graph_node(gf, i);
            if (t->op == GGML_OP_PI_SPARSE_FFN) {
                t->data = ggml_new_tensor(data_ctx, t->type, GGML_MAX_DIMS, t->ne)->data;
                for (int s = 0; s < GGML_MAX_SRC; ++s) {
                    if (t->src[s] && t->src[s]->op == GGML_OP_RESHAPE) {
                        t->src[s]->data = t->src[s]->src[0]->data;
                    }
                }
            }
        }
        double best = 1e9, best_rows = 0.0; // rows read in the fastest repetition
        for (int r = 0; r <= reps; ++r) {
            double rows = 0.0;
            for (auto & l : L) { // a fresh active set per layer and repetition, outside the timing
                std::shuffle(idx.begin(), idx.end(), rng);
                float * sc = (float *) l.score->data;
                std::fill(sc, sc + n_ff, 0.0f);
                for (int64_t k = 0; k < n_act; ++k) {
                    sc[idx[k]] = 1.0f;
                    rows += fires[idx[k]] ? 3 : 1;
                }
            }
            const double t = run(gf, n_threads, tp, work);
            if (r > 0 && t < best) {
                best      = t;
                best_rows = rows;
            }
        }
        const double bytes = best_rows * row_bytes;
        const double gbps = bytes / best / 1e9;
        printf("| %.0f%% | %.2f | %.1f | %.0f%% |\n", 100 * share, best * 1e3, gbps, 100 * gbps / dense_gbps);
        ggml_free(data_ctx);
        ggml_free(g);
    }
    ggml_threadpool_free(tp);
    ggml_free(wctx);
    return 0;
}
