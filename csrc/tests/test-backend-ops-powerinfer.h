// powerinfer_gguf: test cases of GGML_OP_PI_SPARSE_FFN and GGML_OP_PI_GATHER_ROWS
// (ggml/include/ggml-powerinfer.h) and of the out_prod our dense GPU way runs, included by
// test-backend-ops.cpp after test_case and test_out_prod.
//   test: every backend that claims the op against the CPU kernel (F32/F16/BF16 rows and
//         Q4_0/Q8_0/Q4_K/Q6_K, decode and multi-token ubatches, ReLU and dReLU, sparse and
//         all-active, row counts off the kernels' block sizes, rows of a size the CUDA kernel
//         cannot read 16 bytes at a time)
//   perf: GB/s of the rows a decode reads, for 13B- and 7B-shape rows stacked 4 layers deep (so
//         the rows read exceed a GPU's L2), with a fresh active set between timed runs; and the
//         CPU kernel's pairs against its tiles over prompt ubatches, by share of rows selected
//         (the crossover behind GGML_PI_TILE_GAIN: compare the us/run of way=2 and way=4)
#pragma once

#include "ggml-powerinfer.h"

struct test_pi_sparse_ffn : public test_case {
    const ggml_type type;  // gate, up and down_t rows
    const int64_t n_embd;
    const int64_t n_rows;
    const int64_t n_tok;
    const float   active;  // share of (row, token) scores above the threshold
    const bool    drelu;
    const bool    all_active;
    const uint32_t way;    // GGML_PI_SPARSE_PAIRS or GGML_PI_SPARSE_TILES; 0: the kernel's choice
    std::mt19937  rng{1234};

    std::string vars() override {
        return VARS_TO_STR8(type, n_embd, n_rows, n_tok, active, drelu, all_active, way);
    }

    test_pi_sparse_ffn(ggml_type type = GGML_TYPE_F16, int64_t n_embd = 256, int64_t n_rows = 512, int64_t n_tok = 1,
                       float active = 0.1f, bool drelu = false, bool all_active = false, uint32_t way = 0)
        : type(type), n_embd(n_embd), n_rows(n_rows), n_tok(n_tok), active(active), drelu(drelu), all_active(all_active),
          way(way) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
        ggml_tensor * gate   = ggml_new_tensor_2d(ctx, type, n_embd, n_rows);
        ggml_tensor * up     = ggml_new_tensor_2d(ctx, type, n_embd, n_rows);
        ggml_tensor * down_t = ggml_new_tensor_2d(ctx, type, n_embd, n_rows);
        ggml_tensor * score  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rows, n_tok);
        ggml_tensor * thr    = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_rows);
        ggml_set_name(x, "x");
        ggml_set_name(gate, "gate");
        ggml_set_name(up, "up");
        ggml_set_name(down_t, "down_t");
        ggml_set_name(score, "score");
        ggml_set_name(thr, "thr");
        ggml_tensor * out = ggml_pi_sparse_ffn(ctx, x, gate, up, down_t, score, thr,
                                               drelu ? GGML_PI_ACT_DRELU : GGML_PI_ACT_RELU,
                                               (all_active ? GGML_PI_SPARSE_ALL_ACTIVE : 0) | way, nullptr);
        ggml_set_name(out, "out");
        return out;
    }

    // scores 1 with probability `active`, else 0, against thresholds of 0.5
    void draw_active(ggml_tensor * score) {
        std::bernoulli_distribution on(active);
        std::vector<float> s(ggml_nelements(score));
        for (float & v : s) {
            v = on(rng) ? 1.0f : 0.0f;
        }
        ggml_backend_tensor_set(score, s.data(), 0, ggml_nbytes(score));
    }

    void initialize_tensors(ggml_context * ctx) override {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
            if (strcmp(t->name, "score") == 0) {
                draw_active(t);
            } else if (strcmp(t->name, "thr") == 0) {
                std::vector<float> h(ggml_nelements(t), 0.5f);
                ggml_backend_tensor_set(t, h.data(), 0, ggml_nbytes(t));
            } else {
                init_tensor_uniform(t); // symmetric: about half of the computed gates fire
            }
        }
    }

    void reinit_perf_iter(ggml_context * ctx) override {
        draw_active(ggml_get_tensor(ctx, "score"));
    }

    double max_nmse_err() override {
        // the CPU kernel rounds x to the rows' dot-product type (F16, BF16; Q8_0 / Q8_K for
        // quantized rows), the CUDA one does not
        return type == GGML_TYPE_F32 ? 1e-6 : ggml_is_quantized(type) ? 2e-3 : 5e-4;
    }

    // bytes a decode (the perf cases: one token, ReLU) reads: a gate row per computed row, up and
    // down rows where the gate fires (about half: symmetric random data), plus x, scores,
    // thresholds and the output
    size_t op_size(ggml_tensor * t) override {
        const double rows  = (all_active ? 1.0 : active) * (double) n_rows;
        const double row_b = (double) ggml_row_size(type, n_embd);
        const size_t small = ggml_nbytes(t->src[3]) + ggml_nbytes(t->src[4]) + ggml_nbytes(t->src[5]) + ggml_nbytes(t);
        return (size_t) (rows * row_b * (1.0 + 2.0 * 0.5)) + small;
    }
};

// GGML_OP_PI_GATHER_ROWS: kept rows copied, the others zero, on every backend against the CPU;
// rows of widths that take 16-, 4- and 1-byte loads, and a view of rows of a larger weight; async:
// on a GPU's copy stream, copied on the compute stream after ggml_pi_gathered
struct test_pi_gather_rows : public test_case {
    const ggml_type type;
    const int64_t n_embd;
    const int64_t n_rows;
    const float   kept;   // share of rows with a count > 0; < 0: no count (every row)
    const int64_t r0;     // the op reads rows [r0, r0 + n_rows) of a weight of n_rows + r0 rows
    const bool    async;
    std::mt19937  rng{42};

    std::string vars() override {
        return VARS_TO_STR6(type, n_embd, n_rows, kept, r0, async);
    }

    test_pi_gather_rows(ggml_type type = GGML_TYPE_F16, int64_t n_embd = 256, int64_t n_rows = 300, float kept = 0.7f,
                        int64_t r0 = 0, bool async = false)
        : type(type), n_embd(n_embd), n_rows(n_rows), kept(kept), r0(r0), async(async) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * w = ggml_new_tensor_2d(ctx, type, n_embd, n_rows + r0);
        ggml_tensor * count = kept < 0 ? nullptr : ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_rows);
        ggml_set_name(w, "w");
        if (count) {
            ggml_set_name(count, "count");
        }
        ggml_tensor * rows = r0 ? ggml_view_2d(ctx, w, n_embd, n_rows, w->nb[1], r0 * w->nb[1]) : w;
        ggml_tensor * out = async ? ggml_cont(ctx, ggml_pi_gathered(ctx, ggml_pi_gather_rows_async(ctx, rows, count))) :
                                    ggml_pi_gather_rows(ctx, rows, count);
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
            if (strcmp(t->name, "count") == 0) {
                std::bernoulli_distribution on(kept);
                std::vector<float> c(ggml_nelements(t));
                for (float & v : c) {
                    v = on(rng) ? 3.0f : 0.0f;
                }
                ggml_backend_tensor_set(t, c.data(), 0, ggml_nbytes(t));
            } else {
                init_tensor_uniform(t);
            }
        }
    }

    double max_nmse_err() override {
        return 0.0; // a copy
    }

    bool run_whole_graph() override {
        return async; // a node at a time would read the gather before anything waited for it
    }

    std::string op_desc(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return "PI_GATHER_ROWS"; // the async case's output is the copy after the wait
    }
};

static void pi_test_cases_eval(std::vector<std::unique_ptr<test_case>> & test_cases) {
    for (ggml_type type : {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16}) {
        for (int64_t n_embd : {256, 260}) {        // 260 x 2 bytes: rows not a multiple of 16 bytes
            for (int64_t n_rows : {512, 100}) {    // 100: blocks of 8 / 64 rows not filled
                for (int64_t n_tok : {1, 3, 9}) {  // 9: the CUDA down kernel's 8 tokens per launch, twice
                    test_cases.emplace_back(new test_pi_sparse_ffn(type, n_embd, n_rows, n_tok, 0.1f));
                }
            }
        }
        test_cases.emplace_back(new test_pi_sparse_ffn(type, 256, 512, 1, 0.5f));
        test_cases.emplace_back(new test_pi_sparse_ffn(type, 256, 512, 1, 0.3f, true));
        test_cases.emplace_back(new test_pi_sparse_ffn(type, 256, 512, 4, 0.3f, true));
        test_cases.emplace_back(new test_pi_sparse_ffn(type, 256, 512, 1, 1.0f, false, true));
        test_cases.emplace_back(new test_pi_sparse_ffn(type, 256, 512, 5, 1.0f, false, true));
    }
    // what pi-quantize writes (decode and a 3-token ubatch, sparse and all-active)
    for (ggml_type type : {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K}) {
        for (int64_t n_tok : {1, 3}) {
            test_cases.emplace_back(new test_pi_sparse_ffn(type, 512, 300, n_tok, 0.2f));
            test_cases.emplace_back(new test_pi_sparse_ffn(type, 512, 300, n_tok, 1.0f, true, true));
        }
    }
    for (ggml_type type : {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0}) {
        for (int64_t n_embd : {256, 258, 4096}) { // 258 F16: 4-byte loads; Q4_0 rows of 18 bytes a block
            for (float kept : {0.0f, 0.7f, 1.0f}) {
                if (ggml_blck_size(type) == 1 || n_embd % ggml_blck_size(type) == 0) {
                    test_cases.emplace_back(new test_pi_gather_rows(type, n_embd, 300, kept));
                }
            }
        }
        test_cases.emplace_back(new test_pi_gather_rows(type, 256, 300, 0.5f, 77));
        test_cases.emplace_back(new test_pi_gather_rows(type, 4096, 300, 0.7f, 77, true));
        for (bool async : { false, true }) {
            test_cases.emplace_back(new test_pi_gather_rows(type, 4096, 300, -1.0f, 77, async)); // every row: a copy
        }
    }
    test_cases.emplace_back(new test_pi_gather_rows(GGML_TYPE_F16, 255, 300, 0.5f)); // odd bytes: 1-byte loads
    // the dense way's down on a GPU: out_prod(down_t, h^T), down_t F16 (CUDA: pi-out-prod.cu) or
    // F32 (a quantized down dequantized); h transposed as the graph passes it, and plain
    for (ggml_type type : {GGML_TYPE_F16, GGML_TYPE_F32}) {
        for (int64_t n_tok : {1, 9, 64}) {
            for (bool trans_h : {true, false}) {
                test_cases.emplace_back(new test_out_prod(type, GGML_TYPE_F32, 256, n_tok, 300, {1, 1}, {1, 1}, trans_h));
            }
        }
    }
}

static void pi_test_cases_perf(std::vector<std::unique_ptr<test_case>> & test_cases) {
    // 4 layers of rows: at 10% the rows read (~110 MB at 13B) are twice an H200's L2
    for (int64_t n_embd : {5120, 4096}) {
        const int64_t n_ff = n_embd == 5120 ? 13824 : 11008;
        for (float active : {0.1f, 0.2f}) {
            test_cases.emplace_back(new test_pi_sparse_ffn(GGML_TYPE_F16, n_embd, 4 * n_ff, 1, active));
        }
        test_cases.emplace_back(new test_pi_sparse_ffn(GGML_TYPE_F16, n_embd, 4 * n_ff, 1, 1.0f, false, true));
    }
    // pairs against tiles (1B-shape rows: 2048 x 5504)
    for (int64_t n_tok : {64, 512}) {
        for (float active : {0.05f, 0.1f, 0.2f, 0.3f, 0.5f, 1.0f}) {
            for (uint32_t way : {(uint32_t) GGML_PI_SPARSE_PAIRS, (uint32_t) GGML_PI_SPARSE_TILES}) {
                test_cases.emplace_back(new test_pi_sparse_ffn(GGML_TYPE_F16, 2048, 5504, n_tok, active, false, false, way));
            }
        }
    }
}
