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

// Soft-capping (softcap c > 0): the score registers hold t = tanh(softmax_scale·s / c) in place
// of the raw scores s, and c takes softmax_scale's place wherever the scores are scaled (the logits
// are c·t; FlashFwdParams::logit_scale), so the cap costs one tanh per score.
// tanh y = 1 − 2 / (e^(2y) + 1), from one exp2 and one approximate reciprocal (e^(2y) = inf gives
// 1, e^(2y) = 0 gives -1, so the sign needs no special case): t is within about 2^-21 of tanh y,
// the logits within c·2^-21.
// Not tanhf: --use_fast_math, the kernels' flag, turns it into the tanh.approx.f32 instruction,
// whose relative error of about 2^-11 reaches c·2^-11 in the logits: 0.015 at c = 30, above fp16's
// own rounding of such logits (0.008), the baseline of the tests' error rule. The price is a
// second MUFU operation per score (exp2 and reciprocal against tanh.approx's one).
__forceinline__ __device__ float tanh_from_2y_log2e(float x) {  // tanh y for x = 2y·log2(e)
  return 1.f - __fdividef(2.f, exp2f(x) + 1.f);
}

// Caps a tile of raw scores in place, before the masks write -inf over it. exp2_scale:
// FlashFwdParams::softcap_exp2_scale.
template <typename Scores>
__forceinline__ __device__ void softcap_scores(Scores& scores, float exp2_scale) {
  CUTE_UNROLL
  for (int i = 0; i < size(scores); ++i) scores(i) = tanh_from_2y_log2e(scores(i) * exp2_scale);
}

template <int kRows>
struct OnlineSoftmax {
  // Running maximum of the scores as the registers hold them (raw, or t with soft-capping) and
  // this thread's partial sum of exp(scale·(s - max)), scale the logit scale.
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
    float correction[kRows];
    const bool max_moved = update_scores(scores, scale_log2, correction);
    rescale(acc_o, correction, max_moved);
  }

  // update's first half, for kernels whose output accumulator is still being written by an MMA:
  // the statistics and probabilities, and per row the factor the accumulator needs. Returns
  // whether some row's maximum moved (else every factor is 1).
  template <typename Scores>
  __forceinline__ __device__ bool update_scores(Scores& scores, float scale_log2, float (&correction)[kRows]) {
    static_assert(decltype(size<0>(scores))::value == kRows);
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
    return max_moved;
  }

  // update's second half. Once the maxima settle, most tiles leave every row's maximum where it
  // was: the correction is then 1 and the warp skips rescaling the output accumulator.
  template <typename AccO>
  __forceinline__ __device__ void rescale(AccO& acc_o, float const (&correction)[kRows], bool max_moved) {
    if (__any_sync(0xffffffff, max_moved)) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= correction[r];
      }
    }
  }

  // Divides the output by the row sums and returns the log-sum-exp of the logits per row (-inf for
  // a row that saw no key; its output stays 0). scale: FlashFwdParams::logit_scale, of which
  // update's scale_log2 is the log2(e) multiple.
  template <typename AccO>
  __forceinline__ __device__ auto finalize(AccO& acc_o, float scale) {
    Tensor lse = make_tensor<float>(Shape<Int<kRows>>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum(r));
      const bool empty = sum == 0.f || sum != sum;
      const float inv_sum = empty ? 1.f : 1.f / sum;
      lse(r) = empty ? -INFINITY : row_max(r) * scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= inv_sum;
    }
    return lse;
  }
};

}  // namespace jax_flash
