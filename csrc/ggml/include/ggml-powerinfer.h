// powerinfer_gguf: ggml ops of the PowerInfer-style sparse FFN (kernels: ggml-cpu/powerinfer-ops.cpp,
// ggml-cuda/pi-sparse-ffn.cu, ggml-cuda/pi-gather-rows.cu).
//
// GGML_OP_PI_SPARSE_FFN: the FFN of ReLU-family models (ReGLU, dReLU) computed only for the neurons
// a predictor says will fire. The down projection is stored one contiguous row per neuron
// (`down_t`), so an active neuron costs three row reads (gate, up, down) and an inactive one costs
// nothing.
// GGML_OP_PI_GATHER_ROWS: the rows of a weight that a ubatch selects, for a dense GPU FFN over rows
// kept in CPU memory: only those rows cross the bus, beside the compute when asked (async).
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

    enum ggml_pi_act {
        GGML_PI_ACT_RELU  = 0, // h = relu(gate . x) * (up . x)
        GGML_PI_ACT_DRELU = 1, // h = relu(gate . x) * relu(up . x)
    };

    enum ggml_pi_sparse_flags {
        GGML_PI_SPARSE_ALL_ACTIVE = 1, // ignore score/threshold: every row is computed (sparse == dense check)
        // A kernel picks its way per evaluation from the rows the ubatch selects; these force one
        // (tests, measurements). The result is the same within float rounding.
        GGML_PI_SPARSE_PAIRS      = 2, // CPU: one dot product per selected (row, token)
        GGML_PI_SPARSE_TILES      = 4, // CPU: the union of selected rows against every token, in register tiles
    };

    // The CPU kernel's choice when neither is forced: tiles for F32/F16/BF16 rows when a ubatch has
    // at least GGML_PI_TILE_MIN_TOKENS tokens and its selected (row, token) pairs times
    // GGML_PI_TILE_GAIN reach the union of selected rows times the tokens (a pair costs about
    // GAIN times a tile's (row, token); measured, docs/NOTES.md "pairs or tiles").
    #define GGML_PI_TILE_GAIN       4.5
    #define GGML_PI_TILE_MIN_TOKENS 4

    // Counters a kernel adds to (atomically) on every evaluation, when the op is given them: the
    // layout of the op's counters tensor (I64, GGML_PI_N_STATS values).
    struct ggml_pi_sparse_stats {
        int64_t n_evals;     // evaluations of the op
        int64_t n_tokens;    // tokens seen
        int64_t n_rows;      // rows offered, summed over tokens (n_rows x n_tokens)
        int64_t n_predicted; // rows predicted active, summed over tokens: these are read
        int64_t n_fired;     // of those, rows whose activation was non-zero
        // profile of the CPU kernel (the CUDA kernels count nothing: their time is the GPU's)
        int64_t n_up;        // of the predicted rows, those whose gate fired: their up row was read
        int64_t ns;          // wall time inside the kernel (thread 0, entry to exit), summed
        int64_t n_threads;   // threads of the last evaluation
        int64_t n_evals_tiles; // CPU evaluations that ran the tiles way (the others: pairs)
        int64_t n_union;       // CPU: rows any token of the ubatch selected, summed over evaluations
    };
    #define GGML_PI_N_STATS ((int64_t) (sizeof(struct ggml_pi_sparse_stats) / sizeof(int64_t)))

    // out[:, t] = sum over rows j with score[j, t] > threshold[j] of h_j(x_t) * down_t[:, j]
    //
    //   x         F32 [n_embd, T]        FFN input (after ffn_norm)
    //   gate, up  [n_embd, n_rows]       any type with a CPU vec_dot; rows in neuron order
    //   down_t    [n_embd, n_rows]       the down projection, one row per neuron
    //   score     F32 [n_rows, T] or NULL   predictor output (may be a view)
    //   threshold F32 [n_rows] or NULL      per-row threshold
    //   stats     I64 [GGML_PI_N_STATS] or NULL: counters the kernel adds to (struct
    //             ggml_pi_sparse_stats), kept in a buffer of the backend that runs the op (as the
    //             rows are) and read back with ggml_backend_tensor_get, on any backend and over RPC
    //             alike; a copy the scheduler made for another backend would take the counts instead
    //
    // Result F32 [n_embd, T]. With GGML_PI_SPARSE_ALL_ACTIVE, score and threshold may be NULL.
    GGML_API struct ggml_tensor * ggml_pi_sparse_ffn(
            struct ggml_context         * ctx,
            struct ggml_tensor          * x,
            struct ggml_tensor          * gate,
            struct ggml_tensor          * up,
            struct ggml_tensor          * down_t,
            struct ggml_tensor          * score,
            struct ggml_tensor          * threshold,
            enum ggml_pi_act              act,
            uint32_t                      flags,
            struct ggml_tensor          * stats);

    // Accessors for the op's parameters (kernels of every backend read them the same way).
    GGML_API enum ggml_pi_act             ggml_pi_sparse_ffn_act  (const struct ggml_tensor * op);
    GGML_API uint32_t                     ggml_pi_sparse_ffn_flags(const struct ggml_tensor * op);
    // the counters' data in place (a kernel on the backend whose memory holds them), or NULL
    GGML_API struct ggml_pi_sparse_stats * ggml_pi_sparse_ffn_stats(const struct ggml_tensor * op);

    // out = w with every row r whose count[r] <= 0 replaced by zeros (the others copied as bytes)
    //
    //   w      [n_embd, n_rows]  any type; rows contiguous (a view of rows of a weight is fine)
    //   count  F32, n_rows contiguous values (e.g. how many tokens select each row), or NULL: every
    //          row kept (a GPU then copies w with its copy engine, no SMs, at the bus's full rate)
    //
    // Result: contiguous, w's type and shape. A backend that reads w where it lies (the GPU, from
    // its pinned host memory: ggml_pi_reads_in_place) touches only the rows kept.
    GGML_API struct ggml_tensor * ggml_pi_gather_rows(
            struct ggml_context * ctx,
            struct ggml_tensor  * w,
            struct ggml_tensor  * count);

    // How a gather runs (op_params[0]). A GPU runs an async one on a stream of its own, beside the
    // graph's compute stream, so that rows cross the bus while the GEMMs of rows brought over
    // before run; its readers take it through ggml_pi_gathered, which waits for it. Other backends
    // run it in order (waiting is then nothing).
    enum ggml_pi_gather_mode {
        GGML_PI_GATHER_IN_ORDER = 0,
        GGML_PI_GATHER_ASYNC    = 1,
        GGML_PI_GATHER_WAIT     = 2, // ggml_pi_gathered's node
    };

    // ggml_pi_gather_rows on a GPU's copy stream. Memory the graph freed before it is not written
    // until the work before it is done; read its result only through ggml_pi_gathered.
    GGML_API struct ggml_tensor * ggml_pi_gather_rows_async(
            struct ggml_context * ctx,
            struct ggml_tensor  * w,
            struct ggml_tensor  * count);

    // A view of `gathered` (a ggml_pi_gather_rows_async result) whose readers run after the gather
    // is done. It also keeps the gather's count alive until then (the gather still reads it).
    // The wait is a mode of GGML_OP_PI_GATHER_ROWS (no op of its own: ggml's op table stays as is).
    GGML_API struct ggml_tensor * ggml_pi_gathered(
            struct ggml_context * ctx,
            struct ggml_tensor  * gathered);

    GGML_API enum ggml_pi_gather_mode ggml_pi_gather_rows_mode(const struct ggml_tensor * op);

    // Whether `backend` reads source j of `node` where it lies rather than from a copy the
    // scheduler makes: the weight of a gather held in the pinned host memory of the backend's
    // device (which that device addresses directly). The scheduler asks before copying an input.
    GGML_API bool ggml_pi_reads_in_place(ggml_backend_t backend, const struct ggml_tensor * node, int j);

    // Asks the kernel for 2 MB pages over the 2 MB-aligned interior of [data, data + size) when
    // size >= 64 MiB (Linux, THP in "madvise" or "always" mode; elsewhere a no-op). Call before the
    // memory is first touched: scattered row reads (the sparse FFN) then cost far fewer TLB misses.
    // GGML_PI_HUGEPAGES=0 turns it off.
    GGML_API void ggml_pi_advise_hugepages(void * data, size_t size);

#ifdef __cplusplus
}
#endif
