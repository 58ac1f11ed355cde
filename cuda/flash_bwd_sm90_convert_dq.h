// dq = softmax_scale · dq_accum for the Hopper backward, whose dq_accum holds plain rows: each
// thread scales four adjacent floats of a row and writes them to dq's [seqlen, heads, d] row.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "flash_params.h"

namespace jax_flash {

constexpr int kConvertDqRowsThreads = 256;

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(kConvertDqRowsThreads)
    convert_dq_rows_kernel(const __grid_constant__ FlashBwdParams params) {
  const FlashFwdParams& p = params.fwd;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int64_t first = (int64_t(blockIdx.x) * kConvertDqRowsThreads + threadIdx.x) * 4;
  const int row = static_cast<int>(first / kHeadDim), col = static_cast<int>(first % kHeadDim);
  if (row >= p.seqlen_q) return;
  const float4 v = *reinterpret_cast<const float4*>(
      params.dq_accum + (int64_t(batch) * p.num_heads + head) * dq_accum_rows(p.seqlen_q) * kHeadDim + first);
  cutlass::Array<Element, 4> out;
  out[0] = Element(v.x * p.softmax_scale);
  out[1] = Element(v.y * p.softmax_scale);
  out[2] = Element(v.z * p.softmax_scale);
  out[3] = Element(v.w * p.softmax_scale);
  *reinterpret_cast<cutlass::Array<Element, 4>*>(static_cast<Element*>(params.dq) + batch * p.q_batch_stride +
                                                 head * p.q_head_stride + int64_t(row) * p.q_row_stride + col) = out;
}

template <int kHeadDim, typename Element>
void launch_convert_dq_rows(const FlashBwdParams& params, cudaStream_t stream) {
  const FlashFwdParams& p = params.fwd;
  const int64_t chunks = int64_t(p.seqlen_q) * kHeadDim / 4;
  const dim3 grid(static_cast<unsigned>((chunks + kConvertDqRowsThreads - 1) / kConvertDqRowsThreads), p.num_heads,
                  p.batch);
  convert_dq_rows_kernel<kHeadDim, Element><<<grid, kConvertDqRowsThreads, 0, stream>>>(params);
}

}  // namespace jax_flash
