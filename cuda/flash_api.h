// Entry points of the kernel library: validate what the kernels need, pick a kernel, launch.
#pragma once

#include <cuda_runtime_api.h>

#include "flash_params.h"

namespace jax_flash {

// Head dims with compiled kernels (forward and backward) in this build (the build may restrict the set).
// Returns how many were written to `dims` (at most `capacity`).
int supported_head_dims(int* dims, int capacity);

// Launches the forward kernel on `stream`. Returns cudaErrorInvalidValue for parameters
// the kernels do not take, otherwise the launch status.
cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

// Launches the backward kernel on `stream` (dq_accum, and dq_semaphore if set, must be zeroed).
// Returns cudaErrorInvalidValue for parameters the kernels do not take, otherwise the launch status.
cudaError_t run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);

}  // namespace jax_flash
