// Online softmax over key tiles, in registers. Each thread holds a few whole rows' worth of
// columns; the four threads of an MMA quad share a row, so row reductions need two shuffles.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

__forceinline__ __device__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__forceinline__ __device__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <int kRows>
struct OnlineSoftmax {
  // Running maximum of the raw scores and this thread's partial sum of exp(scale·(s - max)).
  Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_max;
  Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_sum;

  __forceinline__ __device__ OnlineSoftmax() {
    fill(row_max, -INFINITY);
    fill(row_sum, 0.f);
  }

  // Folds one tile of scores (rows × cols, overwritten with unnormalized probabilities) into the
  // running statistics and rescales the output accumulator (rows × head dim) to the new maximum.
  template <typename Scores, typename AccO>
  __forceinline__ __device__ void update(Scores& scores, AccO& acc_o, float scale_log2) {
    static_assert(decltype(size<0>(scores))::value == kRows);
    float correction[kRows];
    bool max_moved = false;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float tile_max = row_max(r);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) tile_max = fmaxf(tile_max, scores(r, c));
      const float new_max = quad_max(tile_max);
      // A row with every key masked so far keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
      const float shift = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      correction[r] = exp2f(row_max(r) * scale_log2 - shift);
      max_moved |= new_max != row_max(r);
      row_max(r) = new_max;
      float sum = row_sum(r) * correction[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        scores(r, c) = exp2f(scores(r, c) * scale_log2 - shift);
        sum += scores(r, c);
      }
      row_sum(r) = sum;
    }
    // Once the maxima settle, most tiles leave every row's maximum where it was: the correction
    // is then 1 and the warp skips rescaling the output accumulator.
    if (__any_sync(0xffffffff, max_moved)) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= correction[r];
      }
    }
  }

  // Divides the output by the row sums and returns the log-sum-exp of the scaled scores per row
  // (-inf for a row that saw no key; its output stays 0).
  template <typename AccO>
  __forceinline__ __device__ auto finalize(AccO& acc_o, float softmax_scale) {
    Tensor lse = make_tensor<float>(Shape<Int<kRows>>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum(r));
      const bool empty = sum == 0.f || sum != sum;
      const float inv_sum = empty ? 1.f : 1.f / sum;
      lse(r) = empty ? -INFINITY : row_max(r) * softmax_scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= inv_sum;
    }
    return lse;
  }
};

}  // namespace jax_flash
