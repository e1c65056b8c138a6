// powerinfer_gguf: CPU kernel of GGML_OP_PI_SPARSE_FFN (include/ggml-powerinfer.h).
//
// The work is memory-bound: an active neuron costs a gate row, an up row (skipped when the gate
// does not fire) and a down row, each one contiguous read. One evaluation runs four phases on
// every thread of the pool, with a barrier between each:
//   scan     x converted to the dot-product type; each thread finds the predicted-active rows of
//            a contiguous share of all rows (cheap)
//   gate_up  the active rows (the union of the rows the ubatch's tokens select), in blocks
//            claimed from a shared counter as threads get free (the way ggml's mat-vec shares
//            rows): each neuron's activation per token, kept by its position among the active
//            rows. Two ways, the same result: pairs (a dot product per selected (row, token))
//            or tiles (claimed rows' gates against every token in register tiles, their up too
//            where enough gates fire, then masked),
//            chosen per evaluation from how full the union is (use_tiles)
//   down     the fired (row, token) pairs, shared in equal contiguous counts, row-major: each
//            thread adds its pairs' down rows into a private accumulator, 8 rows per pass
//   reduce   the private accumulators summed, each thread a slice of the output
// Which thread adds which pair depends only on the counts, so the sums are the same every run.
// No allocation: the work buffer comes from the graph plan (pi_layout).
#include "powerinfer-ops.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml-powerinfer.h"
#include "simd-mappings.h"
#include "vec.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr size_t  PI_ALIGN        = 64;
constexpr int     PI_COUNT_STRIDE = 16;  // one cache line of int32 per thread's counter
constexpr int64_t PI_BLOCK        = 8;   // active rows claimed in blocks of this many (some sequential reading)
constexpr int     PI_BUNDLE       = 8;   // down rows added per pass over a token's accumulator
constexpr int64_t PI_PAIR_CHUNK   = 256; // the down phase gathers its pairs this many at a time
// Software prefetch of the first PI_PREFETCH_LINES cache lines of the rows of the neuron
// PI_PREFETCH_AHEAD places further on: enough to start the hardware streamer on each row, without
// the stalls of whole-row prefetches once the line-fill buffers are full.
constexpr int     PI_PREFETCH_AHEAD = 4;
constexpr int     PI_PREFETCH_LINES = 4;
constexpr int64_t PI_RING = 16; // claimed positions not yet computed: a block plus the prefetch distance
static_assert(PI_RING >= PI_BLOCK + PI_PREFETCH_AHEAD + 1, "the ring holds a block and the prefetch distance");
// The tiles way claims PI_TILE_BLOCKS blocks at once, so that many rows share each pass over x,
// and passes over the tokens PI_TILE_TOKENS at a time, so a chunk of x stays in L2 while the
// claimed rows go by (a whole ubatch's x is megabytes)
constexpr int64_t PI_TILE_BLOCKS = 4;
constexpr int64_t PI_TILE_TOKENS = 64;
constexpr int64_t PI_TILE_ROWS   = PI_TILE_BLOCKS * PI_BLOCK;

size_t pi_align(size_t n) { return (n + PI_ALIGN - 1) & ~(PI_ALIGN - 1); }

// Down rows waiting to be added to one token's accumulator: adding PI_BUNDLE rows in one pass
// reads and writes the accumulator once instead of PI_BUNDLE times and keeps PI_BUNDLE row streams
// in flight. Rows are added in the order they came.
struct pi_bundle {
    const char * rows[PI_BUNDLE];
    float        h[PI_BUNDLE];
    int          n;
};

// Offsets into the work buffer (shared parts first, then one slice per thread).
struct pi_layout {
    size_t counts, lists, pairs, xq, acc, scratch, pend, hbuf, bfired, tile, total;
    size_t xq_stride, acc_stride, scratch_stride, pend_stride, tile_stride;
    int64_t list_cap; // one thread's scanned rows: a contiguous share of n_rows
};

pi_layout pi_make_layout(const ggml_tensor * op, int nth) {
    const ggml_tensor * gate = op->src[0];
    const int64_t n_embd = gate->ne[0];
    const int64_t n_rows = gate->ne[1];
    const int64_t n_tok  = op->src[3]->ne[1];
    const ggml_type vdt  = ggml_get_type_traits_cpu(gate->type)->vec_dot_type;

    pi_layout l;
    l.list_cap       = (n_rows + nth - 1) / nth;
    l.xq_stride      = pi_align(ggml_row_size(vdt, n_embd));
    l.acc_stride     = pi_align(sizeof(float) * n_embd * n_tok);
    l.scratch_stride = pi_align(sizeof(float) * n_embd);
    l.pend_stride    = pi_align(sizeof(pi_bundle) * n_tok);
    l.tile_stride    = pi_align(sizeof(float) * 2 * PI_TILE_ROWS * n_tok); // the claimed rows' gate and up dots
    size_t off = 0;
    l.counts  = off; off += pi_align(sizeof(int32_t) * PI_COUNT_STRIDE * (nth + 1)); // + the claim counter
    l.lists   = off; off += pi_align(sizeof(int32_t) * l.list_cap * nth);
    l.pairs   = off; off += pi_align(sizeof(int64_t) * PI_PAIR_CHUNK * nth);
    l.xq      = off; off += l.xq_stride * n_tok;
    l.hbuf    = off; off += pi_align(sizeof(float) * n_rows * n_tok);
    l.bfired  = off; off += pi_align(sizeof(int32_t) * ((n_rows + PI_BLOCK - 1) / PI_BLOCK));
    l.acc     = off; off += l.acc_stride * nth;
    l.scratch = off; off += l.scratch_stride * nth;
    l.pend    = off; off += l.pend_stride * nth;
    l.tile    = off; off += l.tile_stride * nth;
    l.total   = off + PI_ALIGN; // room to align the base pointer
    return l;
}

void pi_prefetch_row(const char * p, size_t bytes) {
    const size_t n = std::min(bytes, (size_t) PI_PREFETCH_LINES * 64);
    for (size_t off = 0; off < n; off += 64) {
        __builtin_prefetch(p + off, 0, 3);
    }
}

// ---------------------------------------------------------------------------------------------
// down rows: acc += sum_k h[k] * rows[k], in order of k

// 16-bit row elements to F32: F16 (hardware conversion) and BF16 (the upper half of an F32)
struct pi_f16 {
    using elem = uint16_t;
    static float one(uint16_t v) { ggml_fp16_t h; std::memcpy(&h, &v, 2); return GGML_CPU_FP16_TO_FP32(h); }
#if defined(__AVX512F__)
    static __m512 x16(const uint16_t * p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p)); }
#endif
#if defined(__AVX2__) && defined(__F16C__)
    static __m256 x8(const uint16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
#endif
};

struct pi_bf16 {
    using elem = uint16_t;
    static float one(uint16_t v) { const uint32_t b = (uint32_t) v << 16; float f; std::memcpy(&f, &b, 4); return f; }
#if defined(__AVX512F__)
    static __m512 x16(const uint16_t * p) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *) p)), 16));
    }
#endif
#if defined(__AVX2__) && defined(__F16C__)
    static __m256 x8(const uint16_t * p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) p)), 16));
    }
#endif
};

// NR 16-bit rows in one pass over acc
template <typename E, int NR>
void pi_axpy_rows_16(int n, float * acc, const char * const * rows, const float * h) {
    const uint16_t * r[NR];
    for (int k = 0; k < NR; ++k) {
        r[k] = (const uint16_t *) rows[k];
    }
    int i = 0;
#if defined(__AVX512F__)
    __m512 hv[NR];
    for (int k = 0; k < NR; ++k) {
        hv[k] = _mm512_set1_ps(h[k]);
    }
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_loadu_ps(acc + i);
        for (int k = 0; k < NR; ++k) {
            a = _mm512_fmadd_ps(E::x16(r[k] + i), hv[k], a);
        }
        _mm512_storeu_ps(acc + i, a);
    }
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 gv[NR];
    for (int k = 0; k < NR; ++k) {
        gv[k] = _mm256_set1_ps(h[k]);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_loadu_ps(acc + i);
        for (int k = 0; k < NR; ++k) {
            a = _mm256_fmadd_ps(E::x8(r[k] + i), gv[k], a);
        }
        _mm256_storeu_ps(acc + i, a);
    }
#endif
    for (; i < n; ++i) {
        float a = acc[i];
        for (int k = 0; k < NR; ++k) {
            a += h[k] * E::one(r[k][i]);
        }
        acc[i] = a;
    }
}

// NR F32 rows in one pass: independent per i, which the compiler vectorizes
template <int NR>
void pi_axpy_rows_f32(int n, float * acc, const char * const * rows, const float * h) {
    const float * r[NR];
    for (int k = 0; k < NR; ++k) {
        r[k] = (const float *) rows[k];
    }
    for (int i = 0; i < n; ++i) {
        float a = acc[i];
        for (int k = 0; k < NR; ++k) {
            a += h[k] * r[k][i];
        }
        acc[i] = a;
    }
}

#if defined(__AVX512F__)
// Quantized rows (what pi-quantize writes: Q4_0, Q8_0, Q4_K, Q6_K), 32 values at a time: a group of
// NR rows dequantized in registers (values32: two vectors of 16 floats) and accumulated into acc's
// 32 floats, which are loaded once for all NR rows, as for 16-bit rows (no scratch, no second
// pass). Layouts: ggml's block_q4_0, block_q8_0, block_q4_K, block_q6_K.
static __m512 pi_cvt16(__m128i u8) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(u8)); }

static __m256i pi_shift_mask(__m256i q, int shift, int mask) { // (q >> shift) & mask, per byte
    return _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8((char) mask));
}

struct pi_q4_0 { // d (F16), 16 bytes: value j < 16 the low nibble of byte j, else the high one of byte j - 16; - 8
    static constexpr int values = 32, bytes = 18;
    static void values32(const uint8_t * b, int, __m512 & v0, __m512 & v1) {
        const __m512 d = _mm512_set1_ps(GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) b));
        const __m128i q = _mm_loadu_si128((const __m128i *) (b + 2));
        const __m512 eight = _mm512_set1_ps(8.0f);
        v0 = _mm512_mul_ps(_mm512_sub_ps(pi_cvt16(_mm_and_si128(q, _mm_set1_epi8(15))), eight), d);
        v1 = _mm512_mul_ps(_mm512_sub_ps(pi_cvt16(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15))), eight), d);
    }
};

struct pi_q8_0 { // d (F16), 32 int8
    static constexpr int values = 32, bytes = 34;
    static void values32(const uint8_t * b, int, __m512 & v0, __m512 & v1) {
        const __m512 d = _mm512_set1_ps(GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) b));
        v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (b + 2)))), d);
        v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (b + 18)))), d);
    }
};

struct pi_q4_k { // d, dmin (F16), 12 bytes of 6-bit scales and mins (one each per 32 values), 128 bytes of nibbles
    static constexpr int values = 256, bytes = 144;
    static void values32(const uint8_t * b, int s, __m512 & v0, __m512 & v1) {
        const uint8_t * sc = b + 4;
        int scale, min;
        if (s < 4) {
            scale = sc[s] & 63;
            min   = sc[s + 4] & 63;
        } else {
            scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
            min   = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
        }
        const __m512 d = _mm512_set1_ps(GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) b) * scale);
        const __m512 m = _mm512_set1_ps(GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) (b + 2)) * min);
        // 32 bytes hold two groups: the even one in the low nibbles, the odd one in the high
        const __m256i q = pi_shift_mask(_mm256_loadu_si256((const __m256i *) (b + 16 + 32 * (s / 2))), 4 * (s & 1), 15);
        v0 = _mm512_fmsub_ps(pi_cvt16(_mm256_castsi256_si128(q)), d, m);
        v1 = _mm512_fmsub_ps(pi_cvt16(_mm256_extracti128_si256(q, 1)), d, m);
    }
};

struct pi_q6_k { // 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 values), d (F16); - 32
    static constexpr int values = 256, bytes = 210;
    static void values32(const uint8_t * b, int s, __m512 & v0, __m512 & v1) {
        const int n = s / 4, quarter = s % 4; // 128-value half, 32-value quarter within it
        const __m256i lo = pi_shift_mask(_mm256_loadu_si256((const __m256i *) (b + 64 * n + 32 * (quarter & 1))),
                                         quarter < 2 ? 0 : 4, 15);
        const __m256i hi = pi_shift_mask(_mm256_loadu_si256((const __m256i *) (b + 128 + 32 * n)), 2 * quarter, 3);
        const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)); // 6 bits: no carry across bytes
        const int8_t * sc = (const int8_t *) (b + 192 + 8 * n) + 2 * quarter;
        const float d = GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) (b + 208));
        const __m512 thirty_two = _mm512_set1_ps(32.0f);
        v0 = _mm512_mul_ps(_mm512_sub_ps(pi_cvt16(_mm256_castsi256_si128(q)), thirty_two), _mm512_set1_ps(d * sc[0]));
        v1 = _mm512_mul_ps(_mm512_sub_ps(pi_cvt16(_mm256_extracti128_si256(q, 1)), thirty_two), _mm512_set1_ps(d * sc[1]));
    }
};

template <typename Q, int NR>
void pi_axpy_rows_q(int n, float * acc, const char * const * rows, const float * h) {
    constexpr int groups = Q::values / 32; // 32-value groups per block
    for (int g = 0; g < n / 32; ++g) {
        const int64_t off = (int64_t) (g / groups) * Q::bytes;
        float * a = acc + 32 * g;
        __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
        for (int k = 0; k < NR; ++k) {
            __m512 v0, v1;
            Q::values32((const uint8_t *) rows[k] + off, g % groups, v0, v1);
            const __m512 hk = _mm512_set1_ps(h[k]);
            a0 = _mm512_fmadd_ps(v0, hk, a0);
            a1 = _mm512_fmadd_ps(v1, hk, a1);
        }
        _mm512_storeu_ps(a, a0);
        _mm512_storeu_ps(a + 16, a1);
    }
}
#endif

// any number of rows in passes of 8, then 4, then one
template <int NR, typename Pass>
int pi_passes(int nr, int k, Pass pass) {
    for (; k + NR <= nr; k += NR) {
        pass(std::integral_constant<int, NR>{}, k);
    }
    return k;
}

// Whether pi_axpy_rows fuses this type's rows (else the down pass dequantizes each row once per
// evaluation and accumulates it for every token it fired for)
bool pi_axpy_fused(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_F32:
            return true;
#if defined(__AVX512F__)
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_K: case GGML_TYPE_Q6_K:
            return true;
#endif
        default:
            return false;
    }
}

// F16/BF16/F32 rows (and, with AVX-512, Q4_0/Q8_0/Q4_K/Q6_K) fused in passes; other types
// dequantized a row at a time into scratch
void pi_axpy_rows(int n, float * acc, const char * const * rows, const float * h, int nr, ggml_type type,
                  float * scratch) {
    auto passes = [&](auto pass) {
        int k = pi_passes<8>(nr, 0, pass);
        k = pi_passes<4>(nr, k, pass);
        pi_passes<1>(nr, k, pass);
    };
    switch (type) {
        case GGML_TYPE_F16:
            passes([&](auto nr_c, int k) { pi_axpy_rows_16<pi_f16, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
        case GGML_TYPE_BF16:
            passes([&](auto nr_c, int k) { pi_axpy_rows_16<pi_bf16, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
        case GGML_TYPE_F32: {
            int k = pi_passes<8>(nr, 0, [&](auto c, int i) { pi_axpy_rows_f32<decltype(c)::value>(n, acc, rows + i, h + i); });
            k = pi_passes<4>(nr, k, [&](auto c, int i) { pi_axpy_rows_f32<decltype(c)::value>(n, acc, rows + i, h + i); });
            for (; k < nr; ++k) {
                ggml_vec_mad_f32(n, acc, (const float *) rows[k], h[k]);
            }
            return;
        }
#if defined(__AVX512F__)
        case GGML_TYPE_Q4_0:
            passes([&](auto nr_c, int k) { pi_axpy_rows_q<pi_q4_0, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
        case GGML_TYPE_Q8_0:
            passes([&](auto nr_c, int k) { pi_axpy_rows_q<pi_q8_0, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
        case GGML_TYPE_Q4_K:
            passes([&](auto nr_c, int k) { pi_axpy_rows_q<pi_q4_k, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
        case GGML_TYPE_Q6_K:
            passes([&](auto nr_c, int k) { pi_axpy_rows_q<pi_q6_k, decltype(nr_c)::value>(n, acc, rows + k, h + k); });
            return;
#endif
        default:
            for (int k = 0; k < nr; ++k) {
                ggml_get_type_traits(type)->to_float(rows[k], scratch, n);
                ggml_vec_mad_f32(n, acc, scratch, h[k]);
            }
            return;
    }
}

// ---------------------------------------------------------------------------------------------
// tiles: the dot products of NR rows with NT tokens' x (F32) in one pass, each row chunk loaded
// once for NT tokens and each x chunk once for NR rows (register tiles, a GEMM's micro-kernel).
// out[k * ld + t] = rows[k] . x[t], x[t] = x0 + t * x_stride.

struct pi_f32 {
    using elem = float;
    static float one(float v) { return v; }
#if defined(__AVX512F__)
    static __m512 x16(const float * p) { return _mm512_loadu_ps(p); }
#endif
#if defined(__AVX2__)
    static __m256 x8(const float * p) { return _mm256_loadu_ps(p); }
#endif
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__) && !defined(__AVX512F__)
float pi_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

template <typename E, int NR, int NT>
void pi_tile_dots(int n, const char * const * rows, const float * x0, int64_t x_stride, float * out, int64_t ld) {
    using T = typename E::elem;
    const T * r[NR];
    const float * x[NT];
    for (int k = 0; k < NR; ++k) {
        r[k] = (const T *) rows[k];
    }
    for (int t = 0; t < NT; ++t) {
        x[t] = x0 + t * x_stride;
    }
    float s[NR][NT];
    int i = 0;
#if defined(__AVX512F__)
    __m512 acc[NR][NT];
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            acc[k][t] = _mm512_setzero_ps();
        }
    }
    for (; i + 16 <= n; i += 16) {
        __m512 xv[NT];
        for (int t = 0; t < NT; ++t) {
            xv[t] = _mm512_loadu_ps(x[t] + i);
        }
        for (int k = 0; k < NR; ++k) {
            const __m512 w = E::x16(r[k] + i);
            for (int t = 0; t < NT; ++t) {
                acc[k][t] = _mm512_fmadd_ps(w, xv[t], acc[k][t]);
            }
        }
    }
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            s[k][t] = _mm512_reduce_add_ps(acc[k][t]);
        }
    }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 acc[NR][NT];
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            acc[k][t] = _mm256_setzero_ps();
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 xv[NT];
        for (int t = 0; t < NT; ++t) {
            xv[t] = _mm256_loadu_ps(x[t] + i);
        }
        for (int k = 0; k < NR; ++k) {
            const __m256 w = E::x8(r[k] + i);
            for (int t = 0; t < NT; ++t) {
                acc[k][t] = _mm256_fmadd_ps(w, xv[t], acc[k][t]);
            }
        }
    }
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            s[k][t] = pi_hsum8(acc[k][t]);
        }
    }
#else
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            s[k][t] = 0.0f;
        }
    }
#endif
    for (; i < n; ++i) {
        for (int k = 0; k < NR; ++k) {
            for (int t = 0; t < NT; ++t) {
                s[k][t] += E::one(r[k][i]) * x[t][i];
            }
        }
    }
    for (int k = 0; k < NR; ++k) {
        for (int t = 0; t < NT; ++t) {
            out[k * ld + t] = s[k][t];
        }
    }
}

// NR rows against nt tokens: tiles of 4 tokens, then the rest
template <typename E, int NR>
void pi_tile_row_group(int n, const char * const * rows, const float * x0, int64_t x_stride, int64_t nt, float * out, int64_t ld) {
    int64_t t = 0;
    for (; t + 4 <= nt; t += 4) {
        pi_tile_dots<E, NR, 4>(n, rows, x0 + t * x_stride, x_stride, out + t, ld);
    }
    switch (nt - t) {
        case 3: pi_tile_dots<E, NR, 3>(n, rows, x0 + t * x_stride, x_stride, out + t, ld); break;
        case 2: pi_tile_dots<E, NR, 2>(n, rows, x0 + t * x_stride, x_stride, out + t, ld); break;
        case 1: pi_tile_dots<E, NR, 1>(n, rows, x0 + t * x_stride, x_stride, out + t, ld); break;
        default: break;
    }
}

template <typename E>
void pi_tile_rows(int n, const char * const * rows, int nr, const float * x0, int64_t x_stride, int64_t nt, float * out, int64_t ld) {
    int k = 0;
    for (; k + 4 <= nr; k += 4) {
        pi_tile_row_group<E, 4>(n, rows + k, x0, x_stride, nt, out + k * ld, ld);
    }
    switch (nr - k) {
        case 3: pi_tile_row_group<E, 3>(n, rows + k, x0, x_stride, nt, out + k * ld, ld); break;
        case 2: pi_tile_row_group<E, 2>(n, rows + k, x0, x_stride, nt, out + k * ld, ld); break;
        case 1: pi_tile_row_group<E, 1>(n, rows + k, x0, x_stride, nt, out + k * ld, ld); break;
        default: break;
    }
}

bool pi_tiles_support(ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 || type == GGML_TYPE_F32;
}

// nr rows of `type` (pi_tiles_support) against nt tokens of F32 x, out[k * ld + t]
void pi_tile(ggml_type type, int n, const char * const * rows, int nr, const float * x0, int64_t x_stride,
             int64_t nt, float * out, int64_t ld) {
    switch (type) {
        case GGML_TYPE_F16:  pi_tile_rows<pi_f16>(n, rows, nr, x0, x_stride, nt, out, ld); return;
        case GGML_TYPE_BF16: pi_tile_rows<pi_bf16>(n, rows, nr, x0, x_stride, nt, out, ld); return;
        case GGML_TYPE_F32:  pi_tile_rows<pi_f32>(n, rows, nr, x0, x_stride, nt, out, ld); return;
        default: GGML_ABORT("pi_tile: type %s has no tiles", ggml_type_name(type));
    }
}

// ---------------------------------------------------------------------------------------------
// the op

// One thread's view of one evaluation: the op's tensors, the work buffer's parts, its counters.
struct pi_sparse_ffn {
    const ggml_compute_params * params;
    const ggml_tensor * gate;
    const ggml_tensor * up;
    const ggml_tensor * down_t;
    const ggml_tensor * x;
    const ggml_tensor * score;
    const float       * thr;
    ggml_tensor       * dst;
    const ggml_type_traits_cpu * traits;
    int ith, nth;
    int64_t n_embd, n_rows, n_tok;
    bool all_active, drelu;
    uint32_t flags;
    pi_layout L;
    char * base;

    int64_t n_pred  = 0; // (row, token) pairs predicted active, this thread's scan
    int64_t n_up    = 0; // up rows read (gates that fired), this thread
    int64_t n_fired = 0; // down rows added (non-zero activations), this thread

    pi_sparse_ffn(const ggml_compute_params * p, ggml_tensor * op)
        : params(p), gate(op->src[0]), up(op->src[1]), down_t(op->src[2]), x(op->src[3]), score(op->src[4]),
          thr(op->src[5] ? (const float *) op->src[5]->data : nullptr), dst(op),
          traits(ggml_get_type_traits_cpu(gate->type)), ith(p->ith), nth(p->nth),
          n_embd(gate->ne[0]), n_rows(gate->ne[1]), n_tok(x->ne[1]),
          all_active(ggml_pi_sparse_ffn_flags(op) & GGML_PI_SPARSE_ALL_ACTIVE),
          drelu(ggml_pi_sparse_ffn_act(op) == GGML_PI_ACT_DRELU), flags(ggml_pi_sparse_ffn_flags(op)),
          L(pi_make_layout(op, p->nth)) {
        GGML_ASSERT(p->wsize >= L.total);
        base = (char *) (((uintptr_t) p->wdata + PI_ALIGN - 1) & ~(uintptr_t) (PI_ALIGN - 1));
    }

    // work buffer parts
    int32_t * count(int t) const  { return (int32_t *) (base + L.counts) + t * PI_COUNT_STRIDE; }
    int32_t * claim() const       { return count(nth); } // next block to claim
    int32_t * list(int t) const   { return (int32_t *) (base + L.lists) + t * L.list_cap; }
    char    * xq(int64_t t) const { return base + L.xq + t * L.xq_stride; }
    float   * hbuf() const        { return (float *) (base + L.hbuf); }   // [n_act][n_tok] by position
    int32_t * bfired() const      { return (int32_t *) (base + L.bfired); } // fired pairs per block
    int64_t * pairs() const       { return (int64_t *) (base + L.pairs) + ith * PI_PAIR_CHUNK; }
    float   * acc() const         { return (float *) (base + L.acc + L.acc_stride * ith); }
    float   * scratch() const     { return (float *) (base + L.scratch + L.scratch_stride * ith); }
    pi_bundle * pend() const      { return (pi_bundle *) (base + L.pend + L.pend_stride * ith); }
    float   * tile() const        { return (float *) (base + L.tile + L.tile_stride * ith); }

    static const char * row_of(const ggml_tensor * w, int64_t j) { return (const char *) w->data + j * w->nb[1]; }
    const float * score_of(int64_t t) const { return (const float *) ((const char *) score->data + t * score->nb[1]); }

    void barrier() const { ggml_barrier(params->threadpool); }

    // the active rows of all threads' lists, as one sequence: position k -> row. Positions are
    // asked in increasing order, so one forward cursor does.
    struct cursor {
        int t = 0;
        int64_t first = 0; // position of list t's first row
    };
    int32_t row_at(cursor & c, int64_t k) const {
        while (k >= c.first + *count(c.t)) {
            c.first += *count(c.t);
            ++c.t;
        }
        return list(c.t)[k - c.first];
    }
    int64_t n_active() const {
        int64_t n = 0;
        for (int t = 0; t < nth; ++t) {
            n += *count(t);
        }
        return n;
    }
    int64_t n_selected() const { // (row, token) pairs selected, all threads' scans
        int64_t n = 0;
        for (int t = 0; t < nth; ++t) {
            n += count(t)[1];
        }
        return n;
    }

    // Tiles when the selected pairs fill enough of the union x tokens that computing all of it in
    // tiles costs less than the pairs alone; every thread decides the same from the same counts.
    bool use_tiles(int64_t n_act) const {
        if (!pi_tiles_support(gate->type) || !pi_tiles_support(up->type) || (flags & GGML_PI_SPARSE_PAIRS)) {
            return false;
        }
        if (flags & GGML_PI_SPARSE_TILES) {
            return true;
        }
        // (below GGML_PI_TILE_MIN_TOKENS too few tokens share a row's loads, and decode skips up rows)
        return n_tok >= GGML_PI_TILE_MIN_TOKENS && (double) n_selected() * GGML_PI_TILE_GAIN >= (double) n_act * n_tok;
    }

    // ---- scan: x to the dot-product type, private state reset, this thread's predicted rows
    void scan() {
        const ggml_type vdt = traits->vec_dot_type;
        for (int64_t t = ith; t < n_tok; t += nth) {
            const float * xt = (const float *) ((const char *) x->data + t * x->nb[1]);
            ggml_get_type_traits_cpu(vdt)->from_float(xt, xq(t), n_embd);
        }
        std::memset(acc(), 0, sizeof(float) * n_embd * n_tok);
        for (int64_t t = 0; t < n_tok; ++t) {
            pend()[t].n = 0;
        }
        const int64_t r0 = n_rows * ith / nth;
        const int64_t r1 = n_rows * (ith + 1) / nth;
        *count(ith) = all_active ? scan_all(r0, r1) : n_tok == 1 ? scan_decode(r0, r1) : scan_ubatch(r0, r1);
        count(ith)[1] = (int32_t) n_pred;
        if (ith == 0) {
            __atomic_store_n(claim(), 0, __ATOMIC_RELAXED); // published by the barrier after the scan
        }
    }

    int32_t scan_all(int64_t r0, int64_t r1) {
        int32_t * mine = list(ith);
        for (int64_t j = r0; j < r1; ++j) {
            mine[j - r0] = (int32_t) j;
        }
        n_pred = (r1 - r0) * n_tok;
        return (int32_t) (r1 - r0);
    }

    // branch-free: ~10% of rows are taken, at random, and a mispredicted branch per row cost more than the compare
    int32_t scan_decode(int64_t r0, int64_t r1) {
        int32_t * mine = list(ith);
        const float * st = score_of(0);
        int32_t n = 0;
        for (int64_t j = r0; j < r1; ++j) {
            mine[n] = (int32_t) j;
            n += st[j] > thr[j];
        }
        n_pred = n;
        return n;
    }

    // a row is active when any token of the ubatch selects it
    int32_t scan_ubatch(int64_t r0, int64_t r1) {
        int32_t * mine = list(ith);
        int32_t n = 0;
        for (int64_t j = r0; j < r1; ++j) {
            int64_t hits = 0;
            for (int64_t t = 0; t < n_tok; ++t) {
                hits += score_of(t)[j] > thr[j];
            }
            if (hits) {
                mine[n++] = (int32_t) j;
                n_pred += hits;
            }
        }
        return n;
    }

    // ---- gate_up: activations of the claimed blocks' neurons, by position
    // activation of neuron j for token t (0: not predicted, or not firing)
    float activation(int32_t j, int64_t t, const char * g_row, const char * u_row) {
        if (!all_active && !(score_of(t)[j] > thr[j])) {
            return 0.0f;
        }
        float g;
        traits->vec_dot((int) n_embd, &g, 0, g_row, 0, xq(t), 0, 1);
        if (!(g > 0.0f)) {
            return 0.0f; // ReLU: a gate that does not fire makes the neuron exactly zero
        }
        float u;
        traits->vec_dot((int) n_embd, &u, 0, u_row, 0, xq(t), 0, 1);
        ++n_up;
        if (drelu && !(u > 0.0f)) {
            return 0.0f;
        }
        return g * u;
    }

    void prefetch_gate_up(int32_t j) const {
        pi_prefetch_row(row_of(gate, j), gate->nb[1]);
        pi_prefetch_row(row_of(up, j), up->nb[1]);
    }

    void gate_up(int64_t n_act) {
        // a ring of claimed positions not yet computed; a block is claimed before the last one
        // runs out, so the prefetch reaches into the next block, and never further ahead than
        // the prefetch distance (a claim beyond it would hold work back from threads that get
        // free later)
        int32_t ring_j[PI_RING];
        int64_t ring_k[PI_RING];
        int64_t head = 0, tail = 0;
        const int64_t n_blocks = (n_act + PI_BLOCK - 1) / PI_BLOCK;
        cursor cur;
        bool drained = false;
        auto fill = [&]() {
            while (!drained && tail - head <= PI_PREFETCH_AHEAD) {
                const int64_t blk = __atomic_fetch_add(claim(), 1, __ATOMIC_RELAXED);
                if (blk >= n_blocks) {
                    drained = true;
                    break;
                }
                const int64_t k1 = std::min(n_act, (blk + 1) * PI_BLOCK);
                for (int64_t k = blk * PI_BLOCK; k < k1; ++k, ++tail) {
                    ring_k[tail % PI_RING] = k;
                    ring_j[tail % PI_RING] = row_at(cur, k);
                }
            }
        };
        float * h = hbuf();
        int32_t * bf = bfired();
        fill();
        for (int64_t q = head; q < std::min(tail, head + PI_PREFETCH_AHEAD); ++q) {
            prefetch_gate_up(ring_j[q % PI_RING]);
        }
        for (; head < tail; fill()) {
            if (head + PI_PREFETCH_AHEAD < tail) {
                prefetch_gate_up(ring_j[(head + PI_PREFETCH_AHEAD) % PI_RING]);
            }
            const int32_t j = ring_j[head % PI_RING];
            const int64_t k = ring_k[head % PI_RING];
            ++head;
            const char * g_row = row_of(gate, j);
            const char * u_row = row_of(up, j);
            int32_t fired = 0;
            for (int64_t t = 0; t < n_tok; ++t) {
                const float a = activation(j, t, g_row, u_row);
                h[k * n_tok + t] = a;
                fired += a != 0.0f;
            }
            // a block's positions all come to its claimer, in order
            bf[k / PI_BLOCK] = (k % PI_BLOCK ? bf[k / PI_BLOCK] : 0) + fired;
        }
    }

    // the tiles way: the claimed rows' gate against every token in tiles, a chunk of tokens at a
    // time; their up in tiles too where enough of the row's gates fire (selected and positive) to
    // pay for a row of tiles, else a dot product per firing gate (few fire: ReLU); then each
    // (row, token) kept where selected and firing, as activation() would
    void gate_up_tiles(int64_t n_act) {
        const int64_t n_claims = (n_act + PI_TILE_ROWS - 1) / PI_TILE_ROWS;
        float * g = tile();
        float * u = g + PI_TILE_ROWS * n_tok;
        cursor cur;
        for (int64_t c; (c = __atomic_fetch_add(claim(), 1, __ATOMIC_RELAXED)) < n_claims;) {
            const int64_t k0 = c * PI_TILE_ROWS, nr = std::min(n_act, k0 + PI_TILE_ROWS) - k0;
            int32_t j[PI_TILE_ROWS];
            const char * rows[PI_TILE_ROWS];
            for (int64_t k = 0; k < nr; ++k) {
                j[k] = row_at(cur, k0 + k);
                rows[k] = row_of(gate, j[k]);
            }
            tiles_over_tokens(gate, rows, nr, g);
            int32_t slot[PI_TILE_ROWS]; // the row's place among the up rows done in tiles, or -1
            int64_t n_tiled = 0;
            for (int64_t k = 0; k < nr; ++k) {
                int64_t n_on = 0;
                for (int64_t t = 0; t < n_tok; ++t) {
                    n_on += gate_on(j[k], t, g[k * n_tok + t]);
                }
                slot[k] = (double) n_on * GGML_PI_TILE_GAIN >= (double) n_tok ? (int32_t) n_tiled : -1;
                if (slot[k] >= 0) {
                    rows[n_tiled++] = row_of(up, j[k]);
                }
            }
            tiles_over_tokens(up, rows, n_tiled, u);
            keep_tiles(k0, nr, j, g, u, slot);
        }
    }

    bool gate_on(int32_t j, int64_t t, float g) const {
        return (all_active || score_of(t)[j] > thr[j]) && g > 0.0f;
    }

    // out[k * n_tok + t] = rows[k] . x[t] for every token, PI_TILE_TOKENS at a time (a chunk of x
    // stays in L2 while the rows go by)
    void tiles_over_tokens(const ggml_tensor * w, const char * const * rows, int64_t nr, float * out) const {
        const float * x0 = (const float *) x->data;
        const int64_t x_stride = x->nb[1] / sizeof(float);
        for (int64_t t0 = 0; nr > 0 && t0 < n_tok; t0 += PI_TILE_TOKENS) {
            const int64_t nt = std::min(PI_TILE_TOKENS, n_tok - t0);
            pi_tile(w->type, (int) n_embd, rows, (int) nr, x0 + t0 * x_stride, x_stride, nt, out + t0, n_tok);
        }
    }

    // activations of the claimed rows, and the fired count of each block
    void keep_tiles(int64_t k0, int64_t nr, const int32_t * j, const float * g, const float * u, const int32_t * slot) {
        float * h = hbuf();
        int32_t * bf = bfired();
        for (int64_t k = 0; k < nr; ++k) {
            const char * u_row = row_of(up, j[k]);
            int32_t fired = 0;
            for (int64_t t = 0; t < n_tok; ++t) {
                const float gk = g[k * n_tok + t];
                float a = 0.0f;
                if (gate_on(j[k], t, gk)) {
                    float uk;
                    if (slot[k] >= 0) {
                        uk = u[slot[k] * n_tok + t];
                    } else {
                        traits->vec_dot((int) n_embd, &uk, 0, u_row, 0, xq(t), 0, 1);
                    }
                    ++n_up;
                    a = !drelu || uk > 0.0f ? gk * uk : 0.0f;
                }
                h[(k0 + k) * n_tok + t] = a;
                fired += a != 0.0f;
            }
            const int64_t b = (k0 + k) / PI_BLOCK;
            bf[b] = ((k0 + k) % PI_BLOCK ? bf[b] : 0) + fired;
        }
    }

    // ---- down: this thread's equal share of the fired (row, token) pairs, row-major in position
    // order (a row that fires for several tokens is read once, for all of them)
    void add_down(int64_t t, const char * d_row, float h) {
        pi_bundle & b = pend()[t];
        b.rows[b.n] = d_row;
        b.h[b.n]    = h;
        if (++b.n == PI_BUNDLE) {
            flush(t);
        }
        ++n_fired;
    }

    // a row of a type pi_axpy_rows does not fuse: dequantized once for the consecutive pairs of
    // its position (pairs come row-major), then accumulated for each of their tokens
    int64_t k_dequantized = -1;
    void add_down_dequantized(int64_t k, int64_t t, const char * d_row, float h) {
        if (k != k_dequantized) {
            ggml_get_type_traits(down_t->type)->to_float(d_row, scratch(), n_embd);
            k_dequantized = k;
        }
        ggml_vec_mad_f32((int) n_embd, acc() + t * n_embd, scratch(), h);
        ++n_fired;
    }

    void flush(int64_t t) {
        pi_bundle & b = pend()[t];
        pi_axpy_rows((int) n_embd, acc() + t * n_embd, b.rows, b.h, b.n, down_t->type, scratch());
        b.n = 0;
    }

    void down(int64_t n_act) {
        const int64_t n_blocks = (n_act + PI_BLOCK - 1) / PI_BLOCK;
        const int32_t * bf = bfired();
        int64_t n_fired_all = 0;
        for (int64_t b = 0; b < n_blocks; ++b) {
            n_fired_all += bf[b];
        }
        const int64_t f0 = n_fired_all * ith / nth, f1 = n_fired_all * (ith + 1) / nth;
        int64_t b = 0, f = 0; // the blocks' counts say where this thread's share starts
        while (b < n_blocks && f + bf[b] <= f0) {
            f += bf[b++];
        }
        const float * h = hbuf();
        const bool fused = pi_axpy_fused(down_t->type);
        k_dequantized = -1;
        const int64_t n_pairs = n_act * n_tok;
        int64_t * own = pairs();
        cursor c, cp; // cp: the prefetch's own cursor, ahead of c
        for (int64_t i = b * PI_BLOCK * n_tok; f < f1 && i < n_pairs;) {
            int64_t n_own = 0;
            for (; i < n_pairs && f < f1 && n_own < PI_PAIR_CHUNK; ++i) {
                if (h[i] != 0.0f) {
                    if (f >= f0) {
                        own[n_own++] = i;
                    }
                    ++f;
                }
            }
            for (int64_t q = 0; q < std::min<int64_t>(n_own, PI_PREFETCH_AHEAD); ++q) {
                pi_prefetch_row(row_of(down_t, row_at(cp, own[q] / n_tok)), down_t->nb[1]);
            }
            for (int64_t q = 0; q < n_own; ++q) {
                if (q + PI_PREFETCH_AHEAD < n_own) {
                    pi_prefetch_row(row_of(down_t, row_at(cp, own[q + PI_PREFETCH_AHEAD] / n_tok)), down_t->nb[1]);
                }
                const int64_t k = own[q] / n_tok; // the pair's position and token
                if (fused) {
                    add_down(own[q] - k * n_tok, row_of(down_t, row_at(c, k)), h[own[q]]);
                } else {
                    add_down_dequantized(k, own[q] - k * n_tok, row_of(down_t, row_at(c, k)), h[own[q]]);
                }
            }
        }
        for (int64_t t = 0; t < n_tok; ++t) {
            if (pend()[t].n) {
                flush(t);
            }
        }
    }

    // ---- reduce: the private accumulators summed, each thread a slice of the output
    void reduce() {
        const int64_t n_out = n_embd * n_tok;
        const int64_t e0 = n_out * ith / nth;
        const int64_t e1 = n_out * (ith + 1) / nth;
        GGML_ASSERT(ggml_is_contiguous(dst));
        float * out = (float *) dst->data;
        for (int64_t e = e0; e < e1; ++e) {
            out[e] = 0.0f;
        }
        for (int k = 0; k < nth; ++k) {
            const float * a = (const float *) (base + L.acc + L.acc_stride * k);
            ggml_vec_add_f32((int) (e1 - e0), out + e0, out + e0, a + e0);
        }
    }

    void add_stats(ggml_pi_sparse_stats * stats) const {
        __atomic_fetch_add(&stats->n_predicted, n_pred,  __ATOMIC_RELAXED);
        __atomic_fetch_add(&stats->n_fired,     n_fired, __ATOMIC_RELAXED);
        __atomic_fetch_add(&stats->n_up,        n_up,    __ATOMIC_RELAXED);
        if (ith == 0) {
            __atomic_fetch_add(&stats->n_evals,  (int64_t) 1,    __ATOMIC_RELAXED);
            __atomic_fetch_add(&stats->n_tokens, n_tok,          __ATOMIC_RELAXED);
            __atomic_fetch_add(&stats->n_rows,   n_rows * n_tok, __ATOMIC_RELAXED);
        }
    }
};

} // namespace

extern "C" size_t ggml_cpu_pi_sparse_ffn_work_size(const ggml_tensor * op, int n_threads) {
    return pi_make_layout(op, n_threads).total;
}

extern "C" void ggml_compute_forward_pi_sparse_ffn(const ggml_compute_params * params, ggml_tensor * dst) {
    ggml_pi_sparse_stats * stats = ggml_pi_sparse_ffn_stats(dst);
    // the profile's clock: thread 0 from entry to exit spans every barrier, so every thread's phases
    const auto t_entry = stats && params->ith == 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};

    pi_sparse_ffn op(params, dst);
    op.scan();
    op.barrier();
    const int64_t n_act = op.n_active();
    const bool tiles = op.use_tiles(n_act);
    if (tiles) {
        op.gate_up_tiles(n_act);
    } else {
        op.gate_up(n_act);
    }
    op.barrier();
    op.down(n_act);
    if (stats) {
        op.add_stats(stats);
    }
    op.barrier();
    op.reduce();

    if (stats && params->ith == 0) {
        const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::steady_clock::now() - t_entry).count();
        __atomic_fetch_add(&stats->ns, ns, __ATOMIC_RELAXED);
        __atomic_store_n(&stats->n_threads, (int64_t) params->nth, __ATOMIC_RELAXED);
        __atomic_fetch_add(&stats->n_evals_tiles, (int64_t) tiles, __ATOMIC_RELAXED);
        __atomic_fetch_add(&stats->n_union, n_act, __ATOMIC_RELAXED);
    }
}

// The reference of GGML_OP_PI_GATHER_ROWS (a GPU reads only the kept rows; here every row is in
// reach anyway): rows split evenly over the threads. In order whatever its mode: nothing to wait for.
extern "C" void ggml_compute_forward_pi_gather_rows(const ggml_compute_params * params, ggml_tensor * dst) {
    if (ggml_pi_gather_rows_mode(dst) == GGML_PI_GATHER_WAIT) {
        return;
    }
    const ggml_tensor * w     = dst->src[0];
    const float *       count = dst->src[1] ? (const float *) dst->src[1]->data : nullptr; // null: every row
    const int64_t n_rows = w->ne[1];
    const size_t  row_b  = ggml_row_size(w->type, w->ne[0]);
    const int64_t per    = (n_rows + params->nth - 1) / params->nth;
    const int64_t r1     = std::min(n_rows, per * (params->ith + 1));
    for (int64_t r = per * params->ith; r < r1; ++r) {
        char * out = (char *) dst->data + r * dst->nb[1];
        if (count == nullptr || count[r] > 0.0f) {
            memcpy(out, (const char *) w->data + r * w->nb[1], row_b);
        } else {
            memset(out, 0, row_b);
        }
    }
}
