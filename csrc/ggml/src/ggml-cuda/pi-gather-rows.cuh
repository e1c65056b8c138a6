// powerinfer_gguf: CUDA kernel of GGML_OP_PI_GATHER_ROWS (pi-gather-rows.cu).
#pragma once

#include "common.cuh"

void ggml_cuda_op_pi_gather_rows(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
