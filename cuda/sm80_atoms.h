// Building blocks both kernel families share on SM80-class tensor cores: the m16n8k16 MMA atom,
// the swizzled shared-memory atom, the ldmatrix atoms and the 16-byte global-memory copy.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace jax_flash {

using namespace cute;

template <typename Element, int kHeadDim, int kNThreads>
struct Sm80Atoms {
  static_assert(kHeadDim % 32 == 0, "head dim must be a multiple of 32");

  // Tensor cores: m16n8k16 with float accumulators.
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

  // Shared memory rows are handled in chunks of 64 (or 32) elements; the XOR swizzle spreads the
  // 8 rows an ldmatrix reads over all 32 banks.
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kBlockKSmem == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));

  // Shared → registers through ldmatrix (plain or transposed); registers → shared two at a time.
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomStore = Copy_Atom<UniversalCopy<uint32_t>, Element>;

  // Global ↔ shared: 16-byte accesses, consecutive threads on consecutive chunks of a row.
  static constexpr int kElemsPer16B = 16 / int(sizeof(Element));
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / kElemsPer16B;
  static_assert(kNThreads % kGmemThreadsPerRow == 0);
  using GmemThreadLayout = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                  Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemValueLayout = Layout<Shape<_1, Int<kElemsPer16B>>>;
  using GmemTiledCopyAsync = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Element>{}, GmemThreadLayout{}, GmemValueLayout{}));
  using GmemTiledCopyStore = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<uint128_t>, Element>{}, GmemThreadLayout{}, GmemValueLayout{}));
};

}  // namespace jax_flash
