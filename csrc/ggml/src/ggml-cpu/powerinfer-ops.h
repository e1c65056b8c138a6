// powerinfer_gguf: CPU kernels of include/ggml-powerinfer.h.
#pragma once

#include "ggml.h"
#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

size_t ggml_cpu_pi_sparse_ffn_work_size(const struct ggml_tensor * op, int n_threads);
void   ggml_compute_forward_pi_sparse_ffn(const struct ggml_compute_params * params, struct ggml_tensor * dst);
void   ggml_compute_forward_pi_gather_rows(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
