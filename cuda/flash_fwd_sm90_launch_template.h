// Launch of the Hopper forward kernel for one head dim and element type (instantiated per head
// dim in instantiations/, compiled for sm_90a only): the TMA descriptors of Q, K, V and O, then the
// kernel.
#pragma once

#include <cuda_runtime_api.h>

#include "flash_fwd_sm90_kernel.h"
#include "flash_params.h"
#include "fwd_sm90_traits.h"
#include "sm90_gmem_matrix.h"

namespace jax_flash {

template <int kHeadDim, typename Element>
cudaError_t run_flash_fwd_sm90_hdim(const FlashFwdParams& params, cudaStream_t stream) {
  using Traits = Sm90FwdTraits<kHeadDim, Element>;
  // The descriptors are encoded through the driver entry point CUTLASS looks up at run time, so _C
  // needs no link to the driver library.
  auto matrix = [&](const void* data, int seqlen, int heads, int64_t row_stride, int64_t head_stride,
                    int64_t batch_stride) {
    return sm90_gmem_matrix<kHeadDim, Element>(data, seqlen, heads, params.batch, row_stride, head_stride, batch_stride);
  };
  const Sm90FwdArgs<Traits> args{
      params,
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(params.q, params.seqlen_q, params.num_heads, params.q_row_stride, params.q_head_stride,
                           params.q_batch_stride),
                    typename Traits::SmemLayoutQ{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(params.k, params.seqlen_k, params.num_heads_k, params.k_row_stride, params.k_head_stride,
                           params.k_batch_stride),
                    typename Traits::SmemLayoutKVTile{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(params.v, params.seqlen_k, params.num_heads_k, params.v_row_stride, params.v_head_stride,
                           params.v_batch_stride),
                    typename Traits::SmemLayoutKVTile{}),
      make_tma_copy(SM90_TMA_STORE{},
                    matrix(params.out, params.seqlen_q, params.num_heads, params.out_row_stride,
                           params.out_head_stride, params.out_batch_stride),
                    typename Traits::SmemLayoutQ{})};
  // Under a window the query tiles' work differs; with every head's heaviest tile started first the
  // SMs finish closer together (2-7% at 4k tokens causal). But the CTAs running at once then read
  // the K and V of all of a batch entry's heads: past 32 MiB of them it lost (3-4% at 16k), L2 no
  // longer holding them. Measured on an H200; benchmarks/NOTES.md.
  const unsigned tiles = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t kv_bytes = int64_t(2) * params.num_heads_k * params.seqlen_k * kHeadDim * sizeof(Element);
  const bool heads_fastest = (params.window_left >= 0 || params.window_right >= 0) &&
                             kv_bytes <= (int64_t(32) << 20) && tiles <= 65535;  // grid y's limit
  auto kernel = heads_fastest ? &flash_fwd_sm90_kernel<Traits, true> : &flash_fwd_sm90_kernel<Traits, false>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid = heads_fastest ? dim3(params.num_heads, tiles, params.batch)
                                  : dim3(tiles, params.num_heads, params.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jax_flash
