// Compile-time description of the Hopper (sm_90a) forward kernel for one head dim: two warpgroups
// of 64 query rows each, wgmma with Q and K read from shared memory for S = QKᵀ and P from
// registers for O = PV, K and V in cp.async rings.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "sm80_atoms.h"

namespace jax_flash {

using namespace cute;

// Key tile per head dim: the S accumulator takes kBlockN/2 registers per thread and O's takes
// kHeadDim/2. kStages slots of K and of V, as many as the 227 KiB of shared memory hold next to
// Q. Head dim 64 has none: this design ran it at 253 TFLOP/s against the SM80 kernel's 293 (H200,
// 4k, 2026-12-01), so it stays there.
template <int kHeadDim> struct Sm90FwdTileSize;
template <> struct Sm90FwdTileSize<128> { static constexpr int kBlockN = 128, kStages = 3; };
template <> struct Sm90FwdTileSize<256> { static constexpr int kBlockN = 64, kStages = 2; };

template <int kHeadDim_, typename Element_>
struct Sm90FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kBlockM = 64 * kWarpGroups;
  static constexpr int kBlockN = Sm90FwdTileSize<kHeadDim>::kBlockN;
  static constexpr int kNThreads = 128 * kWarpGroups;
  static constexpr int kStages = Sm90FwdTileSize<kHeadDim>::kStages;
  static_assert(kHeadDim % 64 == 0, "the 128-byte swizzle atom spans 64 elements of a row");

  // Warpgroups stacked along the query rows: each owns 64 rows of S and O.
  using WarpGroupLayout = Layout<Shape<Int<kWarpGroups>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpGroupLayout{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpGroupLayout{}));

  // Rows of head_dim elements with the 128-byte swizzle wgmma reads; V's bytes read transposed
  // (head dim × keys) are the MN-major operand of P·V.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV>) * int(sizeof(Element));
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an SM90 CTA may have");

  // Global → shared: the SM80 family's 16-byte cp.async over all threads.
  using GmemTiledCopyAsync = typename Sm80Atoms<Element, kHeadDim, kNThreads>::GmemTiledCopyAsync;
};

}  // namespace jax_flash
