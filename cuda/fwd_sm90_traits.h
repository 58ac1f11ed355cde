// Compile-time description of the Hopper (sm_90a) forward kernel for one head dim: a producer
// warpgroup loading Q, K and V by TMA into mbarrier-guarded rings, and two consumer warpgroups
// of 64 query rows each, wgmma with Q and K read from shared memory for S = QKᵀ and P
// from registers for O = PV.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "sm90_gmem_matrix.h"
#include "sm90_warp_roles.h"

namespace jax_flash {

using namespace cute;

// Key tile per head dim: the S accumulator takes kBlockN/2 registers per thread and O's takes
// kHeadDim/2. kStages slots of K and of V, as many as the 227 KiB of shared memory hold next to Q.
// Head dim 64 keeps two consumer warpgroups too: three (192 query rows at 160 registers, which
// spilled) ran at 398 TFLOP/s against two's 410 (H200, 4k, 2026-12-01).
template <int kHeadDim> struct Sm90FwdTileSize;
template <> struct Sm90FwdTileSize<64> { static constexpr int kBlockN = 128, kStages = 3; };
template <> struct Sm90FwdTileSize<128> { static constexpr int kBlockN = 128, kStages = 3; };
template <> struct Sm90FwdTileSize<256> { static constexpr int kBlockN = 64, kStages = 2; };

template <int kHeadDim_, typename Element_>
struct Sm90FwdTraits : Sm90WarpRoles {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64 * kMmaWarpGroups;
  static constexpr int kBlockN = Sm90FwdTileSize<kHeadDim>::kBlockN;
  static constexpr int kStages = Sm90FwdTileSize<kHeadDim>::kStages;
  static_assert(kHeadDim % 64 == 0, "the 128-byte swizzle atom spans 64 elements of a row");

  // Warpgroups stacked along the query rows: each owns 64 rows of S and O.
  using WarpGroupLayout = Layout<Shape<Int<kMmaWarpGroups>, _1, _1>>;
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

  using SmemLayoutKVTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutQ{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutKVTile{}));
  // O leaves through Q's buffer (same shape and layout): registers to shared memory by stmatrix,
  // then one TMA store, which writes whole lines and clips the rows past seqlen_q.
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutQ{}));
  using SmemCopyO = decltype(make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, TiledMmaO{}));
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVTileBytes = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;  // 1024: the swizzle's period
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    alignas(8) uint64_t q_barrier;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an SM90 CTA may have");
};

}  // namespace jax_flash
