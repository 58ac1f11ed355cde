// Launch of the Hopper backward kernel for one head dim and element type (instantiated per head
// dim in instantiations/, compiled for sm_90a only): the TMA descriptors of Q, dO, K and V, the
// kernel, then dq out of the float32 workspace. The caller zero-fills dq_accum.
#pragma once

#include <cuda_runtime_api.h>

#include "bwd_sm90_traits.h"
#include "flash_bwd_sm90_convert_dq.h"
#include "flash_bwd_sm90_kernel.h"
#include "flash_params.h"
#include "sm90_gmem_matrix.h"

namespace jax_flash {

template <int kHeadDim, typename Element>
cudaError_t run_flash_bwd_sm90_hdim(const FlashBwdParams& params, cudaStream_t stream) {
  using Traits = Sm90BwdTraits<kHeadDim, Element>;
  const FlashFwdParams& p = params.fwd;
  auto matrix = [&](const void* data, int seqlen, int heads, int64_t row_stride, int64_t head_stride,
                    int64_t batch_stride) {
    return sm90_gmem_matrix<kHeadDim, Element>(data, seqlen, heads, p.batch, row_stride, head_stride, batch_stride);
  };
  using QTile = typename Traits::SmemLayoutQTile;
  using KVTile = typename Traits::SmemLayoutKV;
  const Sm90BwdArgs<Traits> args{
      params,
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(p.q, p.seqlen_q, p.num_heads, p.q_row_stride, p.q_head_stride, p.q_batch_stride), QTile{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(params.dout, p.seqlen_q, p.num_heads, p.out_row_stride, p.out_head_stride,
                           p.out_batch_stride),
                    QTile{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(p.k, p.seqlen_k, p.num_heads_k, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                    KVTile{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    matrix(p.v, p.seqlen_k, p.num_heads_k, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                    KVTile{})};
  auto kernel = &flash_bwd_sm90_kernel<Traits>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.num_heads, p.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(args);
  launch_convert_dq_rows<kHeadDim, Element>(params, stream);
  return cudaGetLastError();
}

}  // namespace jax_flash
