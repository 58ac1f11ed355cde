// Launch of the backward kernel for one head dim and element type (instantiated per head dim in
// instantiations/): the backward kernel, then dq out of the float32 workspace. The caller zero-fills
// dq_accum (and dq_semaphore when it is set).
#pragma once

#include <cuda_runtime_api.h>

#include "bwd_kernel_traits.h"
#include "flash_bwd_convert_dq.h"
#include "flash_bwd_kernel.h"
#include "flash_params.h"
#include "tile_sizes.h"

namespace jax_flash {

template <int kHeadDim, typename Element, bool kBulkDq>
using BwdTraitsFor = BwdKernelTraits<kHeadDim, BwdTileSize<kHeadDim>::kBlockM, BwdTileSize<kHeadDim>::kBlockN,
                                     BwdTileSize<kHeadDim>::kNWarps, BwdTileSize<kHeadDim>::kWarpsMSdP,
                                     BwdTileSize<kHeadDim>::kWarpsNdKV, BwdTileSize<kHeadDim>::kWarpsMdQ, Element,
                                     kBulkDq>;

template <typename Traits>
cudaError_t launch_flash_bwd(const FlashBwdParams& params, cudaStream_t stream) {
  auto kernel = &flash_bwd_kernel<Traits>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  if constexpr (kSmemBytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (status != cudaSuccess) return status;
  }
  const FlashFwdParams& p = params.fwd;
  const dim3 grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.num_heads, p.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params);
  const dim3 convert_grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.num_heads, p.batch);
  convert_dq_kernel<Traits><<<convert_grid, Traits::kNThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

// The SM90 variant where the code the device runs was compiled for SM90 (ptxVersion is the
// __CUDA_ARCH__ it was compiled with); the SM80 variant everywhere else.
template <int kHeadDim, typename Element>
cudaError_t run_flash_bwd_hdim(const FlashBwdParams& params, cudaStream_t stream) {
  using Sm90Traits = BwdTraitsFor<kHeadDim, Element, true>;
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, &flash_bwd_kernel<Sm90Traits>);
  if (status != cudaSuccess) return status;
  if (attributes.ptxVersion >= 90) return launch_flash_bwd<Sm90Traits>(params, stream);
  return launch_flash_bwd<BwdTraitsFor<kHeadDim, Element, false>>(params, stream);
}

}  // namespace jax_flash
