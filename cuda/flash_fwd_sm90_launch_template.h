// Launch of the Hopper forward kernel for one head dim and element type (instantiated per head
// dim in instantiations/, compiled for sm_90a only).
#pragma once

#include <cuda_runtime_api.h>

#include "flash_fwd_sm90_kernel.h"
#include "flash_params.h"
#include "fwd_sm90_traits.h"

namespace jax_flash {

template <int kHeadDim, typename Element>
cudaError_t run_flash_fwd_sm90_hdim(const FlashFwdParams& params, cudaStream_t stream) {
  using Traits = Sm90FwdTraits<kHeadDim, Element>;
  auto kernel = &flash_fwd_sm90_kernel<Traits>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, params.num_heads, params.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace jax_flash
