// powerinfer_gguf: CUDA kernels of GGML_OP_PI_SPARSE_FFN (pi-sparse-ffn.cu).
#pragma once

#include "common.cuh"

// F32/F16/BF16 rows, even n_embd, F32 x: what the kernels read; other cases stay on the CPU.
bool ggml_cuda_pi_sparse_ffn_supported(const ggml_tensor * op);

void ggml_cuda_op_pi_sparse_ffn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
