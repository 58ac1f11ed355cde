// Launch of the forward kernel for one head dim and element type (instantiated per head dim in
// instantiations/, so that translation units stay few and build in parallel).
#pragma once

#include <cuda_runtime_api.h>

#include "flash_fwd_kernel.h"
#include "flash_params.h"
#include "fwd_kernel_traits.h"
#include "tile_sizes.h"

namespace jax_flash {

template <int kHeadDim, typename Element, bool kScoreMods>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  using Tile = FwdTileSize<kHeadDim>;
  using Traits = FwdKernelTraits<kHeadDim, Tile::kBlockM, Tile::kBlockN, Tile::kNWarps, Element>;
  auto kernel = &flash_fwd_kernel<Traits, kScoreMods>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  if constexpr (kSmemBytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (status != cudaSuccess) return status;
  }
  const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, params.num_heads, params.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

template <int kHeadDim, typename Element>
cudaError_t run_flash_fwd_hdim(const FlashFwdParams& params, cudaStream_t stream) {
  return has_score_mods(params) ? launch_flash_fwd<kHeadDim, Element, true>(params, stream)
                                : launch_flash_fwd<kHeadDim, Element, false>(params, stream);
}

}  // namespace jax_flash
