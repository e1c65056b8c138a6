// powerinfer_gguf: GGML_OP_OUT_PROD of an F16 src0 (pi-out-prod.cu), which upstream CUDA lacks.
#pragma once

#include "common.cuh"

// dst F32 = src0 F16 (rows contiguous) x src1 F32 (plain or a transposed view), broadcast as the CPU does
bool ggml_cuda_pi_out_prod_f16_supported(const ggml_tensor * op);
void ggml_cuda_pi_out_prod_f16(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
