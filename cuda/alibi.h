// ALiBi (attention with linear biases): the logits of query i and key j get
// −slope·|i + seqlen_k − seqlen_q − j|, aligned to the bottom-right corner like causal. The kernels'
// score registers hold logits / logit_scale, so there the bias is −(slope / logit_scale)·|…|.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

// The slope in score-register units for (batch, head): 0 without ALiBi, which then adds nothing.
__forceinline__ __device__ float alibi_register_slope(const FlashFwdParams& params, int batch, int head) {
  if (params.alibi_slopes == nullptr) return 0.f;
  return params.alibi_slopes[int64_t(batch) * params.num_heads + head] / params.logit_scale;
}

// The distances of one tile of a thread's scores, (row, col) at tile coordinates coords(row, col),
// diagonal = m_block·kBlockM + seqlen_k − seqlen_q − n_block·kBlockN. A row's distance is
// |row_offset(r) − col_offset(c)|: one int→float conversion per row and a compile-time column
// offset (a thread's columns are a fixed pattern from its first), so a score costs an FADD and an
// FFMA with |·| and no conversion of its own.
template <typename Coords>
struct AlibiDistances {
  const Coords& coords;
  int diagonal;

  __forceinline__ __device__ float row_offset(int r) const {
    return float(diagonal + get<0>(coords(r, 0)) - get<1>(coords(0, 0)));
  }
  __forceinline__ __device__ float distance(float row_offset, int c) const {
    return fabsf(row_offset - float(get<1>(coords(0, c)) - get<1>(coords(0, 0))));
  }
};

template <typename Coords>
__forceinline__ __device__ AlibiDistances<Coords> alibi_distances(const Coords& coords, int diagonal) {
  return {coords, diagonal};
}

// Adds the bias to a tile of scores in registers (rows × cols), register_slope ≠ 0.
template <typename Scores, typename Coords>
__forceinline__ __device__ void add_alibi(Scores& scores, const AlibiDistances<Coords>& distances,
                                          float register_slope) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(scores); ++r) {
    const float row_offset = distances.row_offset(r);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      scores(r, c) -= register_slope * distances.distance(row_offset, c);
    }
  }
}

// The backward's Σ dS·(−distance) of one CTA, kept per warp in shared memory: a float held in
// registers across the backward's loop made ptxas spill in the plain path too. Warps add their
// tiles in a fixed order and one thread adds the warps in warp order, so the bits are
// reproducible.
template <int kNWarps>
struct DalibiWarpSums {
  float* sums;  // [kNWarps], shared

  // Zeroed sums; a __syncthreads() must come between this and the first add.
  __forceinline__ __device__ static DalibiWarpSums zeroed() {
    __shared__ float sums[kNWarps];
    if (threadIdx.x < kNWarps) sums[threadIdx.x] = 0.f;
    return {sums};
  }

  // Adds every lane's value to its warp's sum; all lanes of the warp call it.
  __forceinline__ __device__ void add(float value) const {
    CUTE_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] += value;
  }

  // Every thread of the CTA calls it, after its last add.
  __forceinline__ __device__ void write_total(float* out) const {
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      CUTE_UNROLL
      for (int warp = 0; warp < kNWarps; ++warp) total += sums[warp];
      *out = total;
    }
  }
};

}  // namespace jax_flash
