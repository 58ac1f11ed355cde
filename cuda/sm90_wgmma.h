// Warpgroup MMA (wgmma, sm_90a) helpers of the Hopper kernel family: issuing a tile GEMM, and views
// of its float accumulators as rows × columns (for the softmax) and as the register A operand of
// the next GEMM (so P never leaves registers).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

namespace jax_flash {

using namespace cute;

// Issues C (+)= A·B over every k block of the fragments as one wgmma group and commits it; the
// caller waits (warpgroup_wait) before touching C, or A when it lives in registers.
template <bool kZeroInit, typename TiledMma, typename FragA, typename FragB, typename FragC>
__forceinline__ __device__ void wgmma_gemm(TiledMma& tiled_mma, FragA& a, FragB const& b, FragC& c) {
  // A from shared memory comes as a fragment of wgmma descriptors, not of values.
  constexpr bool kRegisterA = !is_same_v<typename FragA::value_type, GmmaDescriptor>;
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  tiled_mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(tiled_mma, a(_, _, k), b(_, _, k), c);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// A 64×N wgmma accumulator holds, per thread, ((2 cols, 2 row halves, N/8 col blocks), MMA_M,
// MMA_N); as rows × cols: ((2, MMA_M) rows, (2, N/8, MMA_N) cols). The four threads of a quad
// share each row, as with mma.sync, so OnlineSoftmax works on it unchanged.
template <typename Layout>
__forceinline__ __device__ auto wgmma_acc_rowcol_layout(Layout acc) {
  static_assert(decltype(rank<0>(acc))::value == 3, "expects a wgmma accumulator fragment");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

template <typename Engine, typename Layout>
__forceinline__ __device__ auto wgmma_acc_rowcol(Tensor<Engine, Layout>& acc) {
  return make_tensor(acc.data(), wgmma_acc_rowcol_layout(acc.layout()));
}

// Two neighbouring 8-column blocks of the accumulator are exactly one k16 block of the register A
// operand ((2 cols, 2 row halves, 2 col halves) per thread): ((2, 2, N/8), MMA_M, 1) →
// ((2, 2, 2), MMA_M, N/16).
template <typename Layout>
__forceinline__ __device__ auto wgmma_acc_to_a_layout(Layout acc) {
  static_assert(decltype(size<2>(acc))::value == 1, "expects one accumulator atom along N");
  auto split = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)), get<1>(acc), get<2, 1>(split));
}

}  // namespace jax_flash
