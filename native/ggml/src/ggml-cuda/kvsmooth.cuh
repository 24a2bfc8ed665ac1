#include "common.cuh"

// the longest entropy queue the kernels hold: one value per thread of the update block
#define GGML_CUDA_KVSMOOTH_MAX_QUEUE 256

void ggml_cuda_op_kvsmooth(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
