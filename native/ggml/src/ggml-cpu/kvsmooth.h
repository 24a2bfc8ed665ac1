#pragma once

#include "ggml.h"

#include <stddef.h>

// CPU kernel of GGML_OP_KVSMOOTH (see ggml_kvsmooth in ggml.h)

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

// bytes of work buffer the op needs when run with n_tasks threads
size_t ggml_kvsmooth_work_size(const struct ggml_tensor * dst, int n_tasks);

void ggml_compute_forward_kvsmooth(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
