// The global-memory tiles a forward CTA works on: query tile m_block of one (batch, head) for Q and
// O, and every key tile of the head's kv head (GQA) for K and V.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

// Returns (gQ, gK, gV, gO): (kBlockM, kHeadDim), (kBlockN, kHeadDim, n) twice, (kBlockM, kHeadDim).
template <typename Element, int kBlockM, int kBlockN, int kHeadDim>
__forceinline__ __device__ auto fwd_head_tiles(const FlashFwdParams& params, int batch, int head, int m_block) {
  const int head_k = head / (params.num_heads / params.num_heads_k);
  auto matrix = [](auto* base, int64_t offset, int rows, int64_t row_stride) {  // (rows, kHeadDim)
    return make_tensor(make_gmem_ptr(base + offset), make_shape(rows, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor mQ = matrix(static_cast<const Element*>(params.q), batch * params.q_batch_stride + head * params.q_head_stride,
                     params.seqlen_q, params.q_row_stride);
  Tensor mK = matrix(static_cast<const Element*>(params.k),
                     batch * params.k_batch_stride + head_k * params.k_head_stride, params.seqlen_k, params.k_row_stride);
  Tensor mV = matrix(static_cast<const Element*>(params.v),
                     batch * params.v_batch_stride + head_k * params.v_head_stride, params.seqlen_k, params.v_row_stride);
  Tensor mO = matrix(static_cast<Element*>(params.out),
                     batch * params.out_batch_stride + head * params.out_head_stride, params.seqlen_q,
                     params.out_row_stride);
  using QTile = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using KVTile = Shape<Int<kBlockN>, Int<kHeadDim>>;
  return cute::make_tuple(local_tile(mQ, QTile{}, make_coord(m_block, 0)), local_tile(mK, KVTile{}, make_coord(_, 0)),
                          local_tile(mV, KVTile{}, make_coord(_, 0)), local_tile(mO, QTile{}, make_coord(m_block, 0)));
}

// The lse row of one (batch, head): [seqlen_q] floats.
__forceinline__ __device__ float* lse_row_of(const FlashFwdParams& params, int batch, int head) {
  return params.lse + (int64_t(batch) * params.num_heads + head) * params.seqlen_q;
}

}  // namespace jax_flash
