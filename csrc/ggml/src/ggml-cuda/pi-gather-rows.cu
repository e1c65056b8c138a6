// powerinfer_gguf: CUDA kernel of GGML_OP_PI_GATHER_ROWS (include/ggml-powerinfer.h). The weight
// is usually in pinned host memory, read in place over the bus (the scheduler makes no copy:
// ggml_pi_reads_in_place), so a row whose count is 0 is never read: it is written as zeros.
// One block per row; each thread has several wide loads in flight, since a load over the bus
// takes microseconds.
#include "pi-gather-rows.cuh"
#include "ggml-powerinfer.h"

static constexpr int PI_GATHER_THREADS = 128;
static constexpr int PI_GATHER_UNROLL  = 4; // loads in flight per thread

template <typename V>
static __global__ void pi_gather_rows_kernel(const char * __restrict__ w, size_t nb_w, const float * __restrict__ count,
                                             char * __restrict__ dst, size_t nb_dst, int64_t n_v) {
    const int64_t r = blockIdx.x;
    const V * src = (const V *) (w + r * nb_w);
    V * out = (V *) (dst + r * nb_dst);
    const bool keep = count[r] > 0.0f;
    for (int64_t i0 = threadIdx.x; i0 < n_v; i0 += PI_GATHER_UNROLL * PI_GATHER_THREADS) {
        V v[PI_GATHER_UNROLL];
#pragma unroll
        for (int k = 0; k < PI_GATHER_UNROLL; ++k) {
            const int64_t i = i0 + k * PI_GATHER_THREADS;
            if (i < n_v) {
                v[k] = keep ? src[i] : V{};
            }
        }
#pragma unroll
        for (int k = 0; k < PI_GATHER_UNROLL; ++k) {
            const int64_t i = i0 + k * PI_GATHER_THREADS;
            if (i < n_v) {
                out[i] = v[k];
            }
        }
    }
}

template <typename V>
static void pi_launch_gather(const ggml_tensor * w, const float * count, ggml_tensor * dst, size_t row_b, cudaStream_t stream) {
    pi_gather_rows_kernel<V><<<(unsigned) w->ne[1], PI_GATHER_THREADS, 0, stream>>>(
        (const char *) w->data, w->nb[1], count, (char *) dst->data, dst->nb[1], (int64_t) (row_b / sizeof(V)));
}

static bool pi_aligned(const void * p, size_t a) {
    return ((uintptr_t) p) % a == 0;
}

void ggml_cuda_op_pi_gather_rows(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * w     = dst->src[0];
    const float *       count = (const float *) dst->src[1]->data;
    const size_t row_b = ggml_row_size(w->type, w->ne[0]);
    cudaStream_t stream = ctx.stream();
    GGML_ASSERT(w->ne[1] <= INT_MAX);
    // the widest load every row allows
    auto fits = [&](size_t a) {
        return row_b % a == 0 && w->nb[1] % a == 0 && dst->nb[1] % a == 0 && pi_aligned(w->data, a) && pi_aligned(dst->data, a);
    };
    if (fits(16)) {
        pi_launch_gather<uint4>(w, count, dst, row_b, stream);
    } else if (fits(4)) {
        pi_launch_gather<uint32_t>(w, count, dst, row_b, stream);
    } else {
        pi_launch_gather<uint8_t>(w, count, dst, row_b, stream);
    }
    CUDA_CHECK(cudaGetLastError());
}
