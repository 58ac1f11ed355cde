// Launch of the backward kernel for one head dim and element type (instantiated per head dim in
// instantiations/). The caller zero-fills dq_accum (and dq_semaphore when it is set).
#pragma once

#include <cuda_runtime_api.h>

#include "bwd_kernel_traits.h"
#include "flash_bwd_kernel.h"
#include "flash_params.h"
#include "tile_sizes.h"

namespace jax_flash {

template <int kHeadDim, typename Element>
cudaError_t run_flash_bwd_hdim(const FlashBwdParams& params, cudaStream_t stream) {
  using Tile = BwdTileSize<kHeadDim>;
  using Traits = BwdKernelTraits<kHeadDim, Tile::kBlockM, Tile::kBlockN, Tile::kNWarps, Tile::kWarpsMSdP,
                                 Tile::kWarpsNdKV, Tile::kWarpsMdQ, Element>;
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
  return cudaGetLastError();
}

}  // namespace jax_flash
