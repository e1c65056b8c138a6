// powerinfer_gguf: CUDA kernel of GGML_OP_PI_GATHER_ROWS (include/ggml-powerinfer.h). The weight
// is usually in pinned host memory, read in place over the bus (the scheduler makes no copy:
// ggml_pi_reads_in_place), so a row whose count is 0 is never read: it is written as zeros. Without
// a count every row is kept: one copy by the copy engine.
// A block per row at a time; each thread has several wide loads in flight, since a load over the
// bus takes microseconds. An async gather runs on a low-priority stream of its own (the compute
// stream's blocks are scheduled first) with a grid of a few blocks per SM, so that it leaves SMs to
// the GEMMs it runs beside: the bus, not the SMs, bounds it.
#include "pi-gather-rows.cuh"
#include "ggml-powerinfer.h"

#include <mutex>
#include <unordered_map>
#include <unordered_set>

static constexpr int PI_GATHER_THREADS = 128;
static constexpr int PI_GATHER_UNROLL  = 4; // loads in flight per thread

template <typename V>
static __global__ void pi_gather_rows_kernel(const char * __restrict__ w, size_t nb_w, const float * __restrict__ count,
                                             char * __restrict__ dst, size_t nb_dst, int64_t n_v,
                                             int64_t n_rows) {
    for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
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
}

template <typename V>
static void pi_launch_gather(const ggml_tensor * w, const float * count, ggml_tensor * dst, size_t row_b,
                             unsigned n_blocks, cudaStream_t stream) {
    pi_gather_rows_kernel<V><<<n_blocks, PI_GATHER_THREADS, 0, stream>>>(
        (const char *) w->data, w->nb[1], count, (char *) dst->data, dst->nb[1], (int64_t) (row_b / sizeof(V)), w->ne[1]);
}

// Blocks per SM of an async gather: 4 x 128 threads x 4 loads of 16 B in flight per SM, ~4 MB in
// all on 132 SMs, far above what the bus holds in flight (~55 GB/s x a few us)
static constexpr int PI_GATHER_ASYNC_BLOCKS_PER_SM = 4;

// Per backend context (its compute stream): the copy stream of its async gathers, the event that
// forks it from the compute stream, and the events of the gathers in flight, by their result's
// address (unique while it is alive, which is until its ggml_pi_gathered has run)
struct pi_gather_streams {
    int          device = -1;
    cudaStream_t copy = nullptr;
    cudaEvent_t  fork = nullptr;
    std::unordered_map<const void *, cudaEvent_t> done;
    // results of gathers in flight that nothing waited for yet, and the last one's event: the end
    // of a graph joins them all (the copy stream runs them in order). A wait for one already joined
    // does nothing: its event may belong to another graph's capture, which a wait must not reach.
    std::unordered_set<const void *> outstanding;
    cudaEvent_t last = nullptr;
};
static std::mutex pi_gather_mutex;
static std::unordered_map<const ggml_backend_cuda_context *, pi_gather_streams> pi_gather_state;

static cudaEvent_t pi_new_event() {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
}

// A context's state, its stream and fork event made on first use (the current device is the
// context's). A context at the address of a freed one on another device starts afresh (the old
// stream and events are left: a few handles).
static pi_gather_streams & pi_gather_state_of(const ggml_backend_cuda_context & ctx) {
    pi_gather_streams & st = pi_gather_state[&ctx];
    if (st.device != ctx.device) {
        st = pi_gather_streams();
        st.device = ctx.device;
    }
    if (st.copy == nullptr) {
        int lowest, greatest;
        CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lowest, &greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&st.copy, cudaStreamNonBlocking, lowest));
        st.fork = pi_new_event();
    }
    return st;
}

// The event that marks the gather into `data` done
static cudaEvent_t pi_done_event(pi_gather_streams & st, const void * data) {
    auto it = st.done.find(data);
    if (it == st.done.end()) {
        it = st.done.emplace(data, pi_new_event()).first;
    }
    return it->second;
}

static bool pi_aligned(const void * p, size_t a) {
    return ((uintptr_t) p) % a == 0;
}

void ggml_cuda_op_pi_gather_rows(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_pi_gather_mode mode = ggml_pi_gather_rows_mode(dst);
    std::lock_guard<std::mutex> lock(pi_gather_mutex);
    if (mode == GGML_PI_GATHER_WAIT) {
        pi_gather_streams & st = pi_gather_state_of(ctx);
        if (st.outstanding.erase(dst->src[0]->data) > 0) {
            CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), pi_done_event(st, dst->src[0]->data), 0));
        }
        return;
    }
    const ggml_tensor * w     = dst->src[0];
    const float *       count = dst->src[1] ? (const float *) dst->src[1]->data : nullptr;
    const size_t row_b = ggml_row_size(w->type, w->ne[0]);
    GGML_ASSERT(w->ne[1] <= INT_MAX);
    cudaStream_t stream = ctx.stream();
    unsigned n_blocks = (unsigned) w->ne[1];
    if (mode == GGML_PI_GATHER_ASYNC) {
        // the copy stream starts after the work before it on the compute stream: what it writes
        // may be memory the graph's allocator handed on from a tensor that work still read
        pi_gather_streams & st = pi_gather_state_of(ctx);
        CUDA_CHECK(cudaEventRecord(st.fork, stream));
        CUDA_CHECK(cudaStreamWaitEvent(st.copy, st.fork, 0));
        stream = st.copy;
        n_blocks = std::min<unsigned>(n_blocks, PI_GATHER_ASYNC_BLOCKS_PER_SM * ggml_cuda_info().devices[ctx.device].nsm);
    }
    // the widest load every row allows
    auto fits = [&](size_t a) {
        return row_b % a == 0 && w->nb[1] % a == 0 && dst->nb[1] % a == 0 && pi_aligned(w->data, a) && pi_aligned(dst->data, a);
    };
    if (count == nullptr) { // every row: the copy engine
        CUDA_CHECK(cudaMemcpy2DAsync(dst->data, dst->nb[1], w->data, w->nb[1], row_b, w->ne[1], cudaMemcpyDefault, stream));
    } else if (fits(16)) {
        pi_launch_gather<uint4>(w, count, dst, row_b, n_blocks, stream);
    } else if (fits(4)) {
        pi_launch_gather<uint32_t>(w, count, dst, row_b, n_blocks, stream);
    } else {
        pi_launch_gather<uint8_t>(w, count, dst, row_b, n_blocks, stream);
    }
    CUDA_CHECK(cudaGetLastError());
    if (mode == GGML_PI_GATHER_ASYNC) {
        pi_gather_streams & st = pi_gather_state_of(ctx);
        st.last = pi_done_event(st, dst->data);
        st.outstanding.insert(dst->data);
        CUDA_CHECK(cudaEventRecord(st.last, stream));
    }
}

void ggml_cuda_pi_join_copies(ggml_backend_cuda_context & ctx) {
    std::lock_guard<std::mutex> lock(pi_gather_mutex);
    auto it = pi_gather_state.find(&ctx);
    if (it == pi_gather_state.end()) {
        return; // this context never ran an async gather
    }
    pi_gather_streams & st = it->second;
    if (!st.outstanding.empty()) {
        CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), st.last, 0));
        st.outstanding.clear();
    }
}
