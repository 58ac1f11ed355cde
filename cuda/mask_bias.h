// A boolean mask (as bits, see PackedMask) and an additive bias (see BiasOperand), each
// broadcastable to [batch, num_heads, seqlen_q, seqlen_k], read tile by tile where the kernels
// form the scores; and the bias's gradient, which the backward writes. The score registers hold
// logits / logit_scale, so a bias b adds b / logit_scale there. Not with softcap: the bias goes
// into q·kᵀ before the cap would apply.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

// ---- bias ----

// Sets one tile of score registers (rows × cols, tile coordinates in coords, its first element
// query first_row, key first_col) to bias / logit_scale, 0 outside the sequences, for q·kᵀ to
// accumulate onto: the bias then holds no registers across the GEMM.
template <typename T, typename Scores, typename Coords>
__forceinline__ __device__ void fill_with_bias(Scores& scores, const Coords& coords, const FlashFwdParams& params,
                                               int batch, int head, int first_row, int first_col) {
  const BiasOperand& bias = params.bias;
  const T* tile = static_cast<const T*>(bias.data) + batch * bias.batch_stride + head * bias.head_stride;
  const float register_scale = 1.f / params.logit_scale;
  const int col_stride = static_cast<int>(bias.col_stride);  // 0 or 1
  CUTE_UNROLL
  for (int r = 0; r < size<0>(scores); ++r) {
    const int row = first_row + get<0>(coords(r, 0));
    const T* row_values = tile + row * bias.row_stride;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const int col = first_col + get<1>(coords(0, c));
      const bool inside = row < params.seqlen_q && col < params.seqlen_k;
      scores(r, c) = inside ? float(row_values[col * col_stride]) * register_scale : 0.f;
    }
  }
}

template <typename Scores, typename Coords>
__forceinline__ __device__ void fill_with_bias(Scores& scores, const Coords& coords, const FlashFwdParams& params,
                                               int batch, int head, int first_row, int first_col) {
  switch (params.bias.dtype) {
    case BiasDType::kFloat16:
      return fill_with_bias<__half>(scores, coords, params, batch, head, first_row, first_col);
    case BiasDType::kBFloat16:
      return fill_with_bias<__nv_bfloat16>(scores, coords, params, batch, head, first_row, first_col);
    default: return fill_with_bias<float>(scores, coords, params, batch, head, first_row, first_col);
  }
}

// Adds a tile of dS (the gradient of the logits) into params.dbias, float32 in the bias's shape
// and strides, zeroed by the caller. It reads the 16-bit copy of dS in shared memory (kBlockM ×
// kBlockN at first_row, first_col) after the backward's barrier, when the score registers are
// free: from registers, ptxas spilled in the plain backward too. Each element has one owner
// unless the bias broadcasts: then atomics, a bias broadcast over rows summed over the tile's
// rows first.
template <int kBlockM, int kBlockN, int kNThreads, typename SmemTile>
__forceinline__ __device__ void add_bias_grad(const SmemTile& ds, const FlashBwdParams& params, int batch, int head,
                                              int first_row, int first_col) {
  const FlashFwdParams& p = params.fwd;
  const BiasOperand& bias = p.bias;
  float* grads = params.dbias + batch * bias.batch_stride + head * bias.head_stride;
  const int rows = min(kBlockM, p.seqlen_q - first_row), cols = min(kBlockN, p.seqlen_k - first_col);
  if (bias.row_stride == 0) {
    for (int c = threadIdx.x; c < cols; c += kNThreads) {
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += float(ds(r, c));
      atomicAdd(grads + (first_col + c) * bias.col_stride, sum);
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * kBlockN; e += kNThreads) {
    const int r = e / kBlockN, c = e % kBlockN;
    if (c >= cols) continue;
    float* grad = grads + (first_row + r) * bias.row_stride + (first_col + c) * bias.col_stride;
    if (params.dbias_atomic) {
      atomicAdd(grad, float(ds(r, c)));
    } else {
      *grad = float(ds(r, c));
    }
  }
}

// ---- mask ----

__forceinline__ __device__ const uint32_t* mask_bits_of(const FlashFwdParams& params, int batch, int head) {
  const PackedMask& mask = params.mask;
  return mask.bits + batch * mask.batch_stride + head * mask.head_stride;
}

// Hides what the mask hides in one tile of kBlockN keys (tiles as fill_with_bias's). A thread's
// columns are its first one, col0 < 32, plus compile-time offsets whose remainders mod 32 keep
// col0 + offset % 32 < 32 (true of the SM80 MMA layouts the kernels use): so each row's words,
// shifted right by col0, put every column at a compile-time bit.
template <int kBlockN, typename Scores, typename Coords>
__forceinline__ __device__ void apply_mask_bits(Scores& scores, const Coords& coords, const FlashFwdParams& params,
                                                int batch, int head, int first_row, int first_col) {
  constexpr int kWords = kBlockN / 32;
  static_assert(kBlockN % 32 == 0 && kMaskRowKeys % kBlockN == 0);
  const uint32_t* bits = mask_bits_of(params, batch, head) + first_col / 32;
  const int col0 = get<1>(coords(0, 0));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(scores); ++r) {
    const int row = first_row + get<0>(coords(r, 0));
    if (row >= params.seqlen_q) continue;  // rows the epilogue drops
    const uint32_t* words = bits + row * params.mask.row_stride;
    uint32_t window[kWords];
    CUTE_UNROLL
    for (int w = 0; w < kWords; ++w) {
      const uint32_t next = w + 1 < kWords ? words[w + 1] : 0u;  // bits past the tile are never read
      window[w] = __funnelshift_r(words[w], next, col0);
    }
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const int offset = get<1>(coords(0, c)) - col0;
      if (((window[offset / 32] >> (offset % 32)) & 1u) == 0u) scores(r, c) = -INFINITY;
    }
  }
}

// Whether the mask shows some key of the kBlockM × kBlockN tile at (first_row, first_col) to some
// query; every thread of the CTA calls it and gets the same answer (it is a barrier).
template <int kBlockM, int kBlockN, int kNThreads>
__forceinline__ __device__ bool mask_tile_visible(const FlashFwdParams& params, int batch, int head, int first_row,
                                                  int first_col) {
  constexpr int kWords = kBlockN / 32;
  const uint32_t* bits = mask_bits_of(params, batch, head) + first_col / 32;
  const int rows = min(kBlockM, params.seqlen_q - first_row);
  uint32_t any = 0;
  CUTE_UNROLL
  for (int e = threadIdx.x; e < kBlockM * kWords; e += kNThreads) {
    const int row = e / kWords;
    if (row < rows) any |= bits[(first_row + row) * params.mask.row_stride + e % kWords];
  }
  return __syncthreads_or(any != 0u);
}

}  // namespace jax_flash
