// powerinfer_gguf: graph constructors of include/ggml-powerinfer.h (kernels live with each backend).
#include "ggml-powerinfer.h"
#include "ggml-impl.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// op_params: [0] act, [1] flags (no pointers: a graph's op params cross to RPC servers as bytes)
struct ggml_tensor * ggml_pi_sparse_ffn(
        struct ggml_context         * ctx,
        struct ggml_tensor          * x,
        struct ggml_tensor          * gate,
        struct ggml_tensor          * up,
        struct ggml_tensor          * down_t,
        struct ggml_tensor          * score,
        struct ggml_tensor          * threshold,
        enum ggml_pi_act              act,
        uint32_t                      flags,
        struct ggml_tensor          * stats) {
    const int64_t n_embd = gate->ne[0];
    const int64_t n_rows = gate->ne[1];
    const int64_t n_tok  = x->ne[1];

    GGML_ASSERT(x->type == GGML_TYPE_F32 && x->ne[0] == n_embd && x->ne[2] == 1 && x->ne[3] == 1);
    GGML_ASSERT(ggml_are_same_shape(gate, up) && ggml_are_same_shape(gate, down_t));
    GGML_ASSERT(gate->type == up->type);
    GGML_ASSERT(gate->ne[2] == 1 && gate->ne[3] == 1);
    GGML_ASSERT(act == GGML_PI_ACT_RELU || act == GGML_PI_ACT_DRELU);
    if (!(flags & GGML_PI_SPARSE_ALL_ACTIVE) || score || threshold) {
        GGML_ASSERT(score && threshold);
        GGML_ASSERT(score->type == GGML_TYPE_F32 && score->ne[0] == n_rows && score->ne[1] == n_tok);
        GGML_ASSERT(score->nb[0] == sizeof(float));
        GGML_ASSERT(threshold->type == GGML_TYPE_F32 && ggml_nelements(threshold) == n_rows);
        GGML_ASSERT(ggml_is_contiguous(threshold));
    }
    if (stats) {
        GGML_ASSERT(stats->type == GGML_TYPE_I64 && ggml_nelements(stats) == GGML_PI_N_STATS && ggml_is_contiguous(stats));
    }

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);

    const int32_t params[2] = { (int32_t) act, (int32_t) flags };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_PI_SPARSE_FFN;
    result->src[0] = gate;
    result->src[1] = up;
    result->src[2] = down_t;
    result->src[3] = x;
    result->src[4] = score;
    result->src[5] = threshold;
    result->src[6] = stats;
    return result;
}

enum ggml_pi_act ggml_pi_sparse_ffn_act(const struct ggml_tensor * op) {
    return (enum ggml_pi_act) ggml_get_op_params_i32(op, 0);
}

uint32_t ggml_pi_sparse_ffn_flags(const struct ggml_tensor * op) {
    return (uint32_t) ggml_get_op_params_i32(op, 1);
}

struct ggml_pi_sparse_stats * ggml_pi_sparse_ffn_stats(const struct ggml_tensor * op) {
    return op->src[6] ? (struct ggml_pi_sparse_stats *) op->src[6]->data : NULL;
}

struct ggml_tensor * ggml_pi_gather_rows(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * count) {
    GGML_ASSERT(w->ne[2] == 1 && w->ne[3] == 1);
    GGML_ASSERT(w->nb[0] == ggml_type_size(w->type)); // rows are contiguous bytes
    GGML_ASSERT(count == NULL ||
                (count->type == GGML_TYPE_F32 && ggml_nelements(count) == w->ne[1] && ggml_is_contiguous(count)));

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, w->type, w->ne[0], w->ne[1]);
    result->op     = GGML_OP_PI_GATHER_ROWS;
    result->src[0] = w;
    result->src[1] = count;
    return result;
}

struct ggml_tensor * ggml_pi_gather_rows_async(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * count) {
    struct ggml_tensor * result = ggml_pi_gather_rows(ctx, w, count);
    const int32_t mode = GGML_PI_GATHER_ASYNC;
    ggml_set_op_params(result, &mode, sizeof(mode));
    return result;
}

struct ggml_tensor * ggml_pi_gathered(struct ggml_context * ctx, struct ggml_tensor * gathered) {
    GGML_ASSERT(gathered->op == GGML_OP_PI_GATHER_ROWS && ggml_pi_gather_rows_mode(gathered) == GGML_PI_GATHER_ASYNC);
    struct ggml_tensor * result = ggml_view_tensor(ctx, gathered); // no memory of its own
    const int32_t mode = GGML_PI_GATHER_WAIT;
    ggml_set_op_params(result, &mode, sizeof(mode));
    result->op     = GGML_OP_PI_GATHER_ROWS;
    result->src[0] = gathered;
    result->src[1] = gathered->src[1];
    return result;
}

enum ggml_pi_gather_mode ggml_pi_gather_rows_mode(const struct ggml_tensor * op) {
    return (enum ggml_pi_gather_mode) ggml_get_op_params_i32(op, 0);
}

bool ggml_pi_reads_in_place(ggml_backend_t backend, const struct ggml_tensor * node, int j) {
    if (node->op != GGML_OP_PI_GATHER_ROWS || j != 0 || ggml_pi_gather_rows_mode(node) == GGML_PI_GATHER_WAIT) {
        return false;
    }
    const struct ggml_tensor * w = node->src[0];
    ggml_backend_buffer_t buf = w->view_src ? w->view_src->buffer : w->buffer;
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    if (buf == NULL || dev == NULL || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return false;
    }
    ggml_backend_buffer_type_t host = ggml_backend_dev_host_buffer_type(dev);
    return host != NULL && ggml_backend_buffer_get_type(buf) == host;
}

void ggml_pi_advise_hugepages(void * data, size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t huge = (size_t) 2 << 20;
    const char * env = getenv("GGML_PI_HUGEPAGES");
    if (data == NULL || size < ((size_t) 64 << 20) || (env && strcmp(env, "0") == 0)) {
        return;
    }
    const uintptr_t lo = ((uintptr_t) data + huge - 1) & ~(uintptr_t) (huge - 1);
    const uintptr_t hi = ((uintptr_t) data + size) & ~(uintptr_t) (huge - 1);
    if (hi > lo) {
        madvise((void *) lo, hi - lo, MADV_HUGEPAGE); // advice only: failure leaves 4 KB pages
    }
#else
    (void) data;
    (void) size;
#endif
}
