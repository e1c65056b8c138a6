// powerinfer_gguf: GGML_OP_OUT_PROD with an F16 src0, as the CPU computes it (F32 out). Our down
// weight is stored one row per neuron (down_t [n_embd, n_ff]): out = down_t x h is this op with
// src1 = h transposed, one cuBLAS GEMM with no operand transposed in memory. Without it the
// GPU's dense way copies down_t transposed for every ubatch to reach mul_mat (docs/NOTES.md).
// src1 is converted to F16 first, as upstream's mul_mat does for an F16 weight; accumulation is F32.
#include "pi-out-prod.cuh"
#include "convert.cuh"

bool ggml_cuda_pi_out_prod_f16_supported(const ggml_tensor * op) {
    const ggml_tensor * src0 = op->src[0];
    const ggml_tensor * src1 = op->src[1];
    return op->op == GGML_OP_OUT_PROD && src0->type == GGML_TYPE_F16 && src1->type == GGML_TYPE_F32 &&
           op->type == GGML_TYPE_F32 && src0->nb[0] == sizeof(half) && op->nb[0] == sizeof(float) &&
           (src1->nb[0] == sizeof(float) || src1->nb[1] == sizeof(float)) &&
           op->ne[2] % src0->ne[2] == 0 && op->ne[3] % src0->ne[3] == 0;
}

void ggml_cuda_pi_out_prod_f16(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * src0 = dst->src[0];
    const ggml_tensor * src1 = dst->src[1];
    GGML_TENSOR_BINARY_OP_LOCALS
    GGML_ASSERT(ggml_cuda_pi_out_prod_f16_supported(dst));
    GGML_ASSERT(ne01 == ne11 && ne0 == ne00 && ne1 == ne10 && ne2 == ne12 && ne3 == ne13);

    cudaStream_t stream = ctx.stream();
    // src1 in F16, each slice's contiguous axis kept: k (a transposed view, GEMM reads it as is)
    // or n (GEMM reads it transposed)
    const bool k_contiguous = nb11 == sizeof(float) && nb10 != sizeof(float);
    const int64_t n_in  = k_contiguous ? ne11 : ne10; // elements along the contiguous axis
    const int64_t n_out = k_contiguous ? ne10 : ne11;
    const int64_t s_out = (k_contiguous ? nb10 : nb11) / sizeof(float);
    ggml_cuda_pool_alloc<half> b16(ctx.pool(), ggml_nelements(src1));
    ggml_get_to_fp16_nc_cuda(GGML_TYPE_F32)(src1->data, b16.get(), n_in, n_out, ne12, ne13, s_out,
                                           nb12 / sizeof(float), nb13 / sizeof(float), stream);

    cublasHandle_t handle = ctx.cublas_handle();
    const float alpha = 1.0f;
    const float beta  = 0.0f;
    const cublasOperation_t op_b = k_contiguous ? CUBLAS_OP_N : CUBLAS_OP_T;
    const int64_t dps2 = ne2 / ne02;
    const int64_t dps3 = ne3 / ne03;
    for (int64_t i3 = 0; i3 < ne3; ++i3) {
        for (int64_t i2 = 0; i2 < ne2; ++i2) {
            const char * a = (const char *) src0->data + (i3 / dps3) * nb03 + (i2 / dps2) * nb02;
            const half * b = b16.get() + (i3 * ne2 + i2) * ne10 * ne11;
            char       * c = (char *) dst->data + i3 * nb3 + i2 * nb2;
            CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, op_b, ne0, ne1, ne01,
                                      &alpha, a, CUDA_R_16F, nb01 / sizeof(half),
                                              b, CUDA_R_16F, n_in,
                                      &beta,  c, CUDA_R_32F, nb1 / sizeof(float),
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
        }
    }
}
