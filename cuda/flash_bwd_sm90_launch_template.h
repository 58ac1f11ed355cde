// Launch of the Hopper backward kernel for one head dim and element type (instantiated per head
// dim in instantiations/, compiled for sm_90a only): the order of the CTAs, the TMA descriptors of Q,
// dO, K, V, dK and dV, the kernel, then dq out of the float32 workspace. The caller zero-fills dq_accum.
#pragma once

#include <cuda_runtime_api.h>

#include "bwd_sm90_traits.h"
#include "flash_bwd_sm90_convert_dq.h"
#include "flash_bwd_sm90_kernel.h"
#include "flash_params.h"
#include "sm90_gmem_matrix.h"
#include "sm90_tile_order.h"

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
  const Sm90TileOrder order = Sm90TileOrder::make(
      (p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.batch, p.num_heads,
      int64_t(p.seqlen_q) * kHeadDim * (2 * sizeof(Element) + sizeof(float)),  // Q, dO and dq_accum
      /*equal_tiles=*/p.window_left < 0 && p.window_right < 0);
  const Sm90BwdArgs<Traits> args{
      params,
      order,
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
                    KVTile{}),
      make_tma_copy(SM90_TMA_STORE{},
                    matrix(params.dk, p.seqlen_k, p.num_heads, params.dkv_row_stride, params.dkv_head_stride,
                           params.dkv_batch_stride),
                    KVTile{}),
      make_tma_copy(SM90_TMA_STORE{},
                    matrix(params.dv, p.seqlen_k, p.num_heads, params.dkv_row_stride, params.dkv_head_stride,
                           params.dkv_batch_stride),
                    KVTile{})};
  auto kernel = &flash_bwd_sm90_kernel<Traits>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  kernel<<<unsigned(order.num_ctas()), Traits::kNThreads, kSmemBytes, stream>>>(args);
  launch_convert_dq_rows<kHeadDim, Element>(params, stream);
  return cudaGetLastError();
}

}  // namespace jax_flash
