// dq = softmax_scale · dq_accum: reads each query tile's block of the workspace in the thread order
// of the backward kernel's dQ MMA (see dq_accumulate.h) and writes dq's rows. One CTA per
// (query tile, head, batch), with the backward kernel's thread count and dQ warp grid.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "dq_accumulate.h"
#include "flash_params.h"

namespace jax_flash {

using namespace cute;

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) convert_dq_kernel(const __grid_constant__ FlashBwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  using Tile = DqTileLayout<kBlockM, kHeadDim, Traits::kNThreads>;
  const FlashFwdParams& p = params.fwd;
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int thread_idx = threadIdx.x;

  const float* tile = params.dq_accum +
                      ((int64_t(batch) * p.num_heads + head) * dq_accum_rows(p.seqlen_q) + m_block * kBlockM) * kHeadDim;
  Element* dq = static_cast<Element*>(params.dq) + batch * p.q_batch_stride + head * p.q_head_stride +
                int64_t(m_block) * kBlockM * p.q_row_stride;
  const int rows = p.seqlen_q - m_block * kBlockM;

  // (row, col) of each accumulator this thread held in the dQ MMA, in its register order. The
  // m16n8 accumulator's values come in groups of 4: two adjacent columns of a row, then the same
  // two columns 8 rows down.
  typename Traits::TiledMmadQ mma_dq;
  Tensor coords = mma_dq.get_thread_slice(thread_idx).partition_C(
      make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (MMA, MMA_M, MMA_D)
  static_assert(decltype(size(coords))::value == 4 * Tile::kChunksPerThread);
  CUTE_UNROLL
  for (int c = 0; c < Tile::kChunksPerThread; ++c) {
    const float4 v = *reinterpret_cast<const float4*>(tile + Tile::chunk_offset(c, thread_idx));
    const float pairs[2][2] = {{v.x, v.y}, {v.z, v.w}};
    CUTE_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int row = get<0>(coords(4 * c + 2 * half)), col = get<1>(coords(4 * c + 2 * half));
      if (row >= rows) continue;
      cutlass::Array<Element, 2> out;
      out[0] = Element(pairs[half][0] * p.softmax_scale);
      out[1] = Element(pairs[half][1] * p.softmax_scale);
      *reinterpret_cast<cutlass::Array<Element, 2>*>(dq + row * p.q_row_stride + col) = out;
    }
  }
}

}  // namespace jax_flash
