// Compile-time description of the Hopper (sm_90a) backward kernel for one head dim: a producer
// warpgroup loading K and V once and Q, dO tiles by TMA (lse and delta rows by one warp), and two
// consumer warpgroups owning 64 keys each. Scores are formed transposed (Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ:
// keys are the wgmma's M), so that Pᵀ and dSᵀ are already the register A operands of dV += Pᵀ·dO and
// dK += dSᵀ·Q. dQ = dS·K needs every key of the tile: dS goes through shared memory.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "sm90_gmem_matrix.h"
#include "sm90_warp_roles.h"

namespace jax_flash {

using namespace cute;

// Tiles per head dim. With 128 keys per CTA (kBlockN 128) each consumer warpgroup owns 64 keys
// and whole rows of dK and dV (kHeadDim/2 registers per thread each) and forms Sᵀ, dPᵀ 64 queries
// at a time. At head dim 256 those rows would take all the registers: 64 keys per CTA, shared by
// the two warpgroups, each owning half of the head dim of dK and dV and forming Sᵀ, dPᵀ for half
// of the queries, which reach the other warpgroup through shared memory (kSplitHeadDim).
template <int kHeadDim> struct Sm90BwdTileSize;
template <> struct Sm90BwdTileSize<64> { static constexpr int kBlockM = 128, kBlockN = 128; };
template <> struct Sm90BwdTileSize<128> { static constexpr int kBlockM = 64, kBlockN = 128; };
template <> struct Sm90BwdTileSize<256> { static constexpr int kBlockM = 64, kBlockN = 64; };

template <int kHeadDim_, typename Element_>
struct Sm90BwdTraits : Sm90WarpRoles {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = Sm90BwdTileSize<kHeadDim>::kBlockM;
  static constexpr int kBlockN = Sm90BwdTileSize<kHeadDim>::kBlockN;
  static constexpr bool kSplitHeadDim = kBlockN == 64;
  static_assert(kBlockN == 64 * (kSplitHeadDim ? 1 : kMmaWarpGroups), "64 keys per wgmma M");
  static constexpr int kStages = 2;  // of Q, dO and their row statistics
  // Queries per Sᵀ, dPᵀ block, and head-dim columns of a warpgroup's dK, dV.
  static constexpr int kSdPQueries = kSplitHeadDim ? kBlockM / kMmaWarpGroups : 64;
  static constexpr int kDkvCols = kSplitHeadDim ? kHeadDim / kMmaWarpGroups : kHeadDim;
  // The dQ tile (kBlockM × kHeadDim) split into one 64 × kDqCols block per consumer warpgroup.
  static constexpr int kDqCols = kHeadDim * kBlockM / (64 * kMmaWarpGroups);
  static constexpr int kDqColBlocks = kHeadDim / kDqCols;
  static_assert(kDqCols % 64 == 0, "a dQ block spans whole 128-byte swizzle atoms of K's columns");

  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSdPQueries>, Int<kHeadDim>>>()));
  // Pᵀ and dSᵀ from registers (kSplitHeadDim: from shared memory, every query of the tile).
  using TiledMmadKV = decltype(make_tiled_mma(std::conditional_t<
      kSplitHeadDim,
      decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDkvCols>, Int<kBlockM>>,
                                    GMMA::Major::K, GMMA::Major::MN>()),
      decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDkvCols>, Int<kSdPQueries>>,
                                    GMMA::Major::K, GMMA::Major::MN>())>{}));
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqCols>, Int<kBlockN>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));

  // Rows of head_dim elements with the 128-byte swizzle; their transposed views (head dim × rows)
  // are the MN-major B operands of dV, dK (dO, Q) and dQ (K).
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{})));
  using SmemLayoutQTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // dS (queries × keys), queries contiguous: the MN-major A operand of dQ = dS·K, written from the
  // dSᵀ accumulators as pairs of adjacent queries.
  // P likewise under kSplitHeadDim; their (keys × queries) views are the K-major A operands of dV, dK.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, Step<_2, _1>{})));

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutQTile{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutKV{}));
  // dK and dV leave through K's and V's buffers: registers to shared memory by stmatrix, then a
  // TMA store each, which writes whole lines and clips the keys past seqlen_k.
  using TmaDkv = decltype(make_tma_copy(SM90_TMA_STORE{}, Sm90GmemMatrix<kHeadDim, Element>{}, SmemLayoutKV{}));
  using SmemCopyDkv = decltype(make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, TiledMmadKV{}));
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  using PipelineQdO = cutlass::PipelineTmaAsync<kStages>;  // Q and dO of a query tile, one barrier
  using PipelineStats = cutlass::PipelineAsync<kStages>;   // its lse·log2(e) and delta rows
  static constexpr int kStatsThreads = 32;                 // one warp writes them

  // kSplitHeadDim: P beside dS; dQ is staged in the Q and dO slot just used (shared memory holds no
  // more). Otherwise a staging tile of its own.
  struct PStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>> p;
  };
  struct DqStorage {
    alignas(128) float dq[kBlockM * kHeadDim];  // this key tile's dQ share, rows of dq_accum's order
  };
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;  // 1024: the swizzle's period
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>> ds;
    std::conditional_t<kSplitHeadDim, PStorage, DqStorage> p_or_dq;
    float lse_log2[kStages][kBlockM];
    float delta[kStages][kBlockM];
    typename PipelineQdO::SharedStorage pipeline_qdo;
    typename PipelineStats::SharedStorage pipeline_stats;
    alignas(8) uint64_t kv_barrier;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an SM90 CTA may have");
};

}  // namespace jax_flash
