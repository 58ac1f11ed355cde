// Views of MMA accumulator fragments: as rows × columns for the softmax, and as the A operand
// of the next MMA (so P never leaves registers); plus float → 16-bit conversion of a fragment.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace jax_flash {

using namespace cute;

// m16n8 accumulator ((2 cols, 2 row halves), MMA_M, MMA_N) → ((2, MMA_M) rows, (2, MMA_N) cols).
template <typename Layout>
__forceinline__ __device__ auto acc_rowcol_layout(Layout acc) {
  static_assert(decltype(rank<0>(acc))::value == 2, "expects an m16n8 accumulator fragment");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

template <typename Engine, typename Layout>
__forceinline__ __device__ auto acc_rowcol(Tensor<Engine, Layout>& acc) {
  return make_tensor(acc.data(), acc_rowcol_layout(acc.layout()));
}

// Two neighbouring n8 accumulator tiles hold exactly the values one k16 A fragment needs:
// ((2, 2), MMA_M, MMA_N) → ((2, 2, 2), MMA_M, MMA_N / 2).
template <typename Layout>
__forceinline__ __device__ auto acc_to_a_operand_layout(Layout acc) {
  static_assert(decltype(size<2>(acc))::value % 2 == 0, "needs an even number of n8 tiles");
  auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0, 0>(split), get<0, 1>(split), get<2, 0>(split)),
                     get<1>(split), get<2, 1>(split));
}

// Converts a register fragment of floats into dst, of the same size, element by element in order.
template <typename SrcEngine, typename SrcLayout, typename DstEngine, typename DstLayout>
__forceinline__ __device__ void convert_fragment_into(Tensor<SrcEngine, SrcLayout> const& src,
                                                      Tensor<DstEngine, DstLayout>& dst) {
  using From = typename SrcEngine::value_type;
  using To = typename DstEngine::value_type;
  constexpr int kNumel = decltype(size(src))::value;
  static_assert(decltype(size(dst))::value == kNumel);
  cutlass::NumericArrayConverter<To, From, kNumel> convert;
  *reinterpret_cast<cutlass::Array<To, kNumel>*>(dst.data()) =
      convert(*reinterpret_cast<const cutlass::Array<From, kNumel>*>(src.data()));
}

// Converts a register fragment of floats to `To`, keeping its layout.
template <typename To, typename Engine, typename Layout>
__forceinline__ __device__ auto convert_fragment(Tensor<Engine, Layout> const& src) {
  Tensor dst = make_tensor<To>(src.layout());
  convert_fragment_into(src, dst);
  return dst;
}

}  // namespace jax_flash
