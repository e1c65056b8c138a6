// powerinfer_gguf: CUDA kernels of GGML_OP_PI_SPARSE_FFN (include/ggml-powerinfer.h), for the hot
// rows a VRAM budget puts on the GPU (llama-powerinfer-placement.cpp). Same rule as the CPU kernel: row j of token t
// is computed iff score[j, t] > threshold[j] (or ALL_ACTIVE), up is skipped where the gate does not
// fire, and an inactive neuron contributes exactly zero. Two kernels:
//   1. activations: one warp per row, dot products of gate (and up) with x -> act[t, j]
//   2. down: out[:, t] += sum_j act[t, j] * down_t[j, :], a block per (column slice, row chunk);
//      a row whose activations are all zero is skipped by the whole block (no divergence), so
//      down rows of neurons that do not fire are never read.
// Rows F32/F16/BF16, or what pi-quantize writes (Q4_0, Q8_0, Q4_K, Q6_K), read two values at a time
// (pi_get2: a pair never straddles a block). Decode-sized ubatches only (the graph runs larger ones
// densely); counters (stats) are CPU-only.
#include "pi-sparse-ffn.cuh"
#include "ggml-powerinfer.h"

static constexpr int PI_ACT_WARPS    = 8;   // rows per block of kernel 1
static constexpr int PI_DOWN_THREADS = 256; // threads per block of kernel 2, 2 columns each
static constexpr int PI_DOWN_ROWS    = 64;  // rows per block of kernel 2
static constexpr int PI_MAX_TOK      = 8;   // tokens per launch of kernel 2

static __device__ __forceinline__ float pi_to_f(float v)         { return v; }
static __device__ __forceinline__ float pi_to_f(half v)          { return __half2float(v); }
static __device__ __forceinline__ float pi_to_f(nv_bfloat16 v)   { return __bfloat162float(v); }

// Rows of ggml's quantized block types, as tags: values i, i + 1 (i even) of a row, dequantized
struct pi_q4_0 {}; // block_q4_0: d (half), qs[16]: value j < 16 the low nibble of qs[j], else the high one of qs[j - 16]; -8
struct pi_q8_0 {}; // block_q8_0: d (half), qs[32] int8
struct pi_q4_k {}; // block_q4_K: d, dmin (half), scales[12] (6-bit scale and min per 32 values), qs[128]
struct pi_q6_k {}; // block_q6_K: ql[128], qh[64], scales[16] int8, d (half)

template <typename T>
static __device__ __forceinline__ float2 pi_get2(const char * row, int64_t i) {
    const T * p = (const T *) row + i;
    return make_float2(pi_to_f(p[0]), pi_to_f(p[1]));
}

static __device__ __forceinline__ float pi_half_at(const uint8_t * p) {
    return __half2float(*(const half *) p);
}

template <>
__device__ __forceinline__ float2 pi_get2<pi_q4_0>(const char * row, int64_t i) {
    const uint8_t * b = (const uint8_t *) row + (i / 32) * 18;
    const int j = (int) (i % 32);
    const float d = pi_half_at(b);
    const uint8_t * q = b + 2 + (j & 15);
    const int sh = j < 16 ? 0 : 4;
    return make_float2(d * (float) (((q[0] >> sh) & 15) - 8), d * (float) (((q[1] >> sh) & 15) - 8));
}

template <>
__device__ __forceinline__ float2 pi_get2<pi_q8_0>(const char * row, int64_t i) {
    const uint8_t * b = (const uint8_t *) row + (i / 32) * 34;
    const int8_t * q = (const int8_t *) (b + 2) + i % 32;
    const float d = pi_half_at(b);
    return make_float2(d * q[0], d * q[1]);
}

// scale and min of sub-block is (0..7) of a Q4_K block: 6 bits each, packed in 12 bytes
static __device__ __forceinline__ void pi_q4_k_scale_min(const uint8_t * sc, int is, int & s, int & m) {
    if (is < 4) {
        s = sc[is] & 63;
        m = sc[is + 4] & 63;
    } else {
        s = (sc[is + 4] & 15) | ((sc[is - 4] >> 6) << 4);
        m = (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4);
    }
}

template <>
__device__ __forceinline__ float2 pi_get2<pi_q4_k>(const char * row, int64_t i) {
    const uint8_t * b = (const uint8_t *) row + (i / 256) * 144;
    const int j = (int) (i % 256);
    const int g = j / 64, l = j % 64; // 64 values per 32 bytes of qs: low nibbles, then high ones
    int s, m;
    pi_q4_k_scale_min(b + 4, 2 * g + (l >= 32), s, m);
    const float d = pi_half_at(b) * s, mn = pi_half_at(b + 2) * m;
    const uint8_t * q = b + 16 + 32 * g + (l & 31);
    const int sh = l < 32 ? 0 : 4;
    return make_float2(d * ((q[0] >> sh) & 15) - mn, d * ((q[1] >> sh) & 15) - mn);
}

template <>
__device__ __forceinline__ float2 pi_get2<pi_q6_k>(const char * row, int64_t i) {
    const uint8_t * b = (const uint8_t *) row + (i / 256) * 210;
    const int j = (int) (i % 256);
    const int n = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
    const uint8_t * ql = b + 64 * n + (quarter & 1) * 32 + l; // quarters 0, 2: ql[l]; 1, 3: ql[l + 32]
    const uint8_t * qh = b + 128 + 32 * n + l;
    const int lo_sh = quarter < 2 ? 0 : 4, hi_sh = 2 * quarter;
    const int8_t sc = ((const int8_t *) (b + 192 + 8 * n))[l / 16 + 2 * quarter];
    const float d = pi_half_at(b + 208) * sc;
    const int q0 = (((ql[0] >> lo_sh) & 15) | (((qh[0] >> hi_sh) & 3) << 4)) - 32;
    const int q1 = (((ql[1] >> lo_sh) & 15) | (((qh[1] >> hi_sh) & 3) << 4)) - 32;
    return make_float2(d * q0, d * q1);
}

// dot(row, x) over n elements of a quantized row, one warp: each lane two values at a time, the
// warp over 64 consecutive values (one or two blocks) per step
template <typename T>
static __device__ __forceinline__ float pi_warp_dot_q(const char * __restrict__ row, const float * __restrict__ x, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 2 * threadIdx.x; i < n; i += 64) {
        const float2 w = pi_get2<T>(row, i);
        sum += w.x * x[i] + w.y * x[i + 1];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(0xffffffff, sum, off);
    }
    return sum;
}

// dot(row, x) over n elements, one warp; 16-byte loads when the row allows it
template <typename T>
static __device__ __forceinline__ float pi_warp_dot(const T * __restrict__ row, const float * __restrict__ x, int64_t n, bool vec) {
    float sum = 0.0f;
    const int lane = threadIdx.x;
    if (vec) {
        constexpr int E = 16 / sizeof(T); // elements per 16-byte load
        for (int64_t i = (int64_t) lane * E; i < n; i += 32 * E) {
            const float4 raw = *(const float4 *) (row + i);
            const T * w = (const T *) &raw;
#pragma unroll
            for (int k = 0; k < E; ++k) {
                sum += pi_to_f(w[k]) * x[i + k];
            }
        }
    } else {
        for (int64_t i = lane; i < n; i += 32) {
            sum += pi_to_f(row[i]) * x[i];
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(0xffffffff, sum, off);
    }
    return sum;
}

template <typename T>
static __device__ __forceinline__ float pi_row_dot(const char * row, const float * x, int64_t n, bool vec) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, nv_bfloat16>) {
        return pi_warp_dot((const T *) row, x, n, vec);
    } else {
        return pi_warp_dot_q<T>(row, x, n);
    }
}

template <typename T>
static __global__ void pi_act_kernel(const char * __restrict__ gate, const char * __restrict__ up, size_t nb_row,
                                     const float * __restrict__ x, size_t nb_x,
                                     const float * __restrict__ score, size_t nb_score, const float * __restrict__ thr,
                                     float * __restrict__ act, int64_t n_embd, int64_t n_rows, int64_t n_tok,
                                     bool all_active, bool drelu, bool vec) {
    const int64_t j = (int64_t) blockIdx.x * PI_ACT_WARPS + threadIdx.y;
    if (j >= n_rows) {
        return;
    }
    const char * g_row = gate + j * nb_row;
    const char * u_row = up   + j * nb_row;
    for (int64_t t = 0; t < n_tok; ++t) {
        float a = 0.0f;
        const bool on = all_active || ((const float *) ((const char *) score + t * nb_score))[j] > thr[j];
        if (on) {
            const float * xt = (const float *) ((const char *) x + t * nb_x);
            const float g = pi_row_dot<T>(g_row, xt, n_embd, vec);
            if (g > 0.0f) { // ReLU: a gate that does not fire makes the neuron exactly zero
                const float u = pi_row_dot<T>(u_row, xt, n_embd, vec);
                a = (drelu && !(u > 0.0f)) ? 0.0f : g * u;
            }
        }
        if (threadIdx.x == 0) {
            act[t * n_rows + j] = a;
        }
    }
}


template <typename T>
static __global__ void pi_down_kernel(const char * __restrict__ down_t, size_t nb_row, const float * __restrict__ act,
                                      float * __restrict__ dst, size_t nb_dst, int64_t n_embd, int64_t n_rows,
                                      int64_t t0, int n_tok) {
    __shared__ float a_sh[PI_DOWN_ROWS][PI_MAX_TOK];
    __shared__ int   nz_sh[PI_DOWN_ROWS];
    const int64_t j0 = (int64_t) blockIdx.y * PI_DOWN_ROWS;
    const int     nj = (int) (n_rows - j0 < PI_DOWN_ROWS ? n_rows - j0 : PI_DOWN_ROWS);
    for (int r = threadIdx.x; r < nj; r += blockDim.x) {
        int nz = 0;
        for (int t = 0; t < n_tok; ++t) {
            const float a = act[(t0 + t) * n_rows + j0 + r];
            a_sh[r][t] = a;
            nz |= a != 0.0f;
        }
        nz_sh[r] = nz;
    }
    __syncthreads();

    const int64_t e = ((int64_t) blockIdx.x * PI_DOWN_THREADS + threadIdx.x) * 2;
    if (e >= n_embd) {
        return;
    }
    float2 acc[PI_MAX_TOK];
#pragma unroll
    for (int t = 0; t < PI_MAX_TOK; ++t) {
        acc[t] = make_float2(0.0f, 0.0f);
    }
    for (int r = 0; r < nj; ++r) {
        if (!nz_sh[r]) {
            continue; // the same for every thread of the block: the row is not read at all
        }
        const float2 w = pi_get2<T>(down_t + (j0 + r) * nb_row, e);
#pragma unroll
        for (int t = 0; t < PI_MAX_TOK; ++t) {
            if (t < n_tok) {
                const float a = a_sh[r][t];
                acc[t].x += a * w.x;
                acc[t].y += a * w.y;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < PI_MAX_TOK; ++t) {
        if (t < n_tok && (acc[t].x != 0.0f || acc[t].y != 0.0f)) {
            float * out = (float *) ((char *) dst + (t0 + t) * nb_dst) + e;
            atomicAdd(out,     acc[t].x);
            atomicAdd(out + 1, acc[t].y);
        }
    }
}

static bool pi_row_type(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_K: case GGML_TYPE_Q6_K:
            return true;
        default:
            return false;
    }
}

bool ggml_cuda_pi_sparse_ffn_supported(const ggml_tensor * op) {
    const ggml_tensor * gate   = op->src[0];
    const ggml_tensor * down_t = op->src[2];
    const ggml_tensor * x      = op->src[3];
    const ggml_tensor * up     = op->src[1];
    return pi_row_type(gate->type) && pi_row_type(down_t->type) && x->type == GGML_TYPE_F32 &&
           gate->ne[0] % 2 == 0 && gate->nb[0] == ggml_type_size(gate->type) && up->type == gate->type &&
           up->nb[0] == gate->nb[0] && up->nb[1] == gate->nb[1] && down_t->ne[1] <= 65535ll * 64 &&
           down_t->nb[0] == ggml_type_size(down_t->type) && x->nb[0] == sizeof(float);
}

template <typename T>
static void pi_launch_act(const ggml_tensor * dst, float * act, bool vec, cudaStream_t stream) {
    const ggml_tensor * gate = dst->src[0];
    const ggml_tensor * up   = dst->src[1];
    const ggml_tensor * x    = dst->src[3];
    const ggml_tensor * score = dst->src[4];
    const ggml_tensor * thr   = dst->src[5];
    const bool all_active = (ggml_pi_sparse_ffn_flags(dst) & GGML_PI_SPARSE_ALL_ACTIVE) || score == nullptr;
    const int64_t n_rows = gate->ne[1];
    const dim3 block(32, PI_ACT_WARPS);
    const dim3 grid((unsigned) ((n_rows + PI_ACT_WARPS - 1) / PI_ACT_WARPS));
    GGML_ASSERT(gate->nb[1] == up->nb[1]);
    pi_act_kernel<T><<<grid, block, 0, stream>>>(
        (const char *) gate->data, (const char *) up->data, gate->nb[1],
        (const float *) x->data, x->nb[1],
        all_active ? nullptr : (const float *) score->data, all_active ? 0 : score->nb[1],
        all_active ? nullptr : (const float *) thr->data,
        act, gate->ne[0], n_rows, x->ne[1], all_active,
        ggml_pi_sparse_ffn_act(dst) == GGML_PI_ACT_DRELU, vec);
}

template <typename T>
static void pi_launch_down(const ggml_tensor * dst, const float * act, cudaStream_t stream) {
    const ggml_tensor * down_t = dst->src[2];
    const int64_t n_embd = down_t->ne[0];
    const int64_t n_rows = down_t->ne[1];
    const int64_t n_tok  = dst->ne[1];
    const dim3 grid((unsigned) ((n_embd / 2 + PI_DOWN_THREADS - 1) / PI_DOWN_THREADS),
                    (unsigned) ((n_rows + PI_DOWN_ROWS - 1) / PI_DOWN_ROWS));
    for (int64_t t0 = 0; t0 < n_tok; t0 += PI_MAX_TOK) {
        const int nt = (int) std::min<int64_t>(PI_MAX_TOK, n_tok - t0);
        pi_down_kernel<T><<<grid, PI_DOWN_THREADS, 0, stream>>>(
            (const char *) down_t->data, down_t->nb[1], act, (float *) dst->data, dst->nb[1],
            n_embd, n_rows, t0, nt);
    }
}

void ggml_cuda_op_pi_sparse_ffn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * gate   = dst->src[0];
    const ggml_tensor * down_t = dst->src[2];
    const int64_t n_rows = gate->ne[1];
    const int64_t n_tok  = dst->ne[1];
    cudaStream_t stream = ctx.stream();

    ggml_cuda_pool_alloc<float> act(ctx.pool(), n_rows * n_tok);
    const size_t esz = ggml_type_size(gate->type);
    const bool vec = (gate->ne[0] * (int64_t) esz) % 16 == 0 && ((uintptr_t) gate->data) % 16 == 0 &&
                     ((uintptr_t) dst->src[1]->data) % 16 == 0 && gate->nb[1] % 16 == 0;
    switch (gate->type) {
        case GGML_TYPE_F32:  pi_launch_act<float>(dst, act.get(), vec, stream);       break;
        case GGML_TYPE_F16:  pi_launch_act<half>(dst, act.get(), vec, stream);        break;
        case GGML_TYPE_BF16: pi_launch_act<nv_bfloat16>(dst, act.get(), vec, stream); break;
        case GGML_TYPE_Q4_0: pi_launch_act<pi_q4_0>(dst, act.get(), false, stream);   break;
        case GGML_TYPE_Q8_0: pi_launch_act<pi_q8_0>(dst, act.get(), false, stream);   break;
        case GGML_TYPE_Q4_K: pi_launch_act<pi_q4_k>(dst, act.get(), false, stream);   break;
        case GGML_TYPE_Q6_K: pi_launch_act<pi_q6_k>(dst, act.get(), false, stream);   break;
        default: GGML_ABORT("pi_sparse_ffn: gate type %s", ggml_type_name(gate->type));
    }
    CUDA_CHECK(cudaGetLastError());

    CUDA_CHECK(cudaMemsetAsync(dst->data, 0, ggml_nbytes(dst), stream));
    switch (down_t->type) {
        case GGML_TYPE_F32:  pi_launch_down<float>(dst, act.get(), stream);       break;
        case GGML_TYPE_F16:  pi_launch_down<half>(dst, act.get(), stream);        break;
        case GGML_TYPE_BF16: pi_launch_down<nv_bfloat16>(dst, act.get(), stream); break;
        case GGML_TYPE_Q4_0: pi_launch_down<pi_q4_0>(dst, act.get(), stream);     break;
        case GGML_TYPE_Q8_0: pi_launch_down<pi_q8_0>(dst, act.get(), stream);     break;
        case GGML_TYPE_Q4_K: pi_launch_down<pi_q4_k>(dst, act.get(), stream);     break;
        case GGML_TYPE_Q6_K: pi_launch_down<pi_q6_k>(dst, act.get(), stream);     break;
        default: GGML_ABORT("pi_sparse_ffn: down_t type %s", ggml_type_name(down_t->type));
    }
    CUDA_CHECK(cudaGetLastError());
}
