// powerinfer_gguf: CUDA kernel of GGML_OP_PI_GATHER_ROWS (pi-gather-rows.cu).
#pragma once

#include "common.cuh"

void ggml_cuda_op_pi_gather_rows(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// Makes the compute stream wait for the copy stream's last async gather, if one is pending: called
// at the end of every graph the backend runs (patches/0002), so that a gather whose wait the
// scheduler put in a later graph (a split) never outlives its graph's CUDA-graph capture.
void ggml_cuda_pi_join_copies(ggml_backend_cuda_context & ctx);
