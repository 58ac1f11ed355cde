// Compile-time description of one backward kernel: tile shape, the warp layouts of its three
// MMAs (S and dP over (kBlockM, kBlockN); dK and dV over (kBlockN, d); dQ over (kBlockM, d)),
// and the shared-memory layouts with the transposed views that ldmatrix.trans reads.
#pragma once

#include <cute/tensor.hpp>

#include "dq_accumulate.h"
#include "flash_params.h"
#include "sm80_atoms.h"

namespace jax_flash {

using namespace cute;

// Largest dynamic shared memory of one CTA: A100 163 KiB, H100 227 KiB.
constexpr int kSm80SmemBudgetBytes = 163 * 1024;
constexpr int kSm90SmemBudgetBytes = 227 * 1024;

// kBulkDq: the SM90 variant, which adds dQ through a shared-memory staging tile and TMA bulk
// reductions (see dq_accumulate.h) and may use the larger shared memory of SM90.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kWarpsMSdP, int kWarpsNdKV, int kWarpsMdQ,
          typename Element_, bool kBulkDq_>
struct BwdKernelTraits : Sm80Atoms<Element_, kHeadDim_, kNWarps_ * 32> {
  using Atoms = Sm80Atoms<Element_, kHeadDim_, kNWarps_ * 32>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kBulkDq = kBulkDq_;
  static constexpr int kSmemBudgetBytes = kBulkDq ? kSm90SmemBudgetBytes : kSm80SmemBudgetBytes;

  template <int kWarpsM>
  using WarpGrid = TiledMMA<typename Atoms::MmaAtom, Layout<Shape<Int<kWarpsM>, Int<kNWarps / kWarpsM>, _1>>,
                            Tile<Int<16 * kWarpsM>, Int<16 * (kNWarps / kWarpsM)>, _16>>;
  // A warp grid's tile, 16·warps_m × 16·warps_n, must divide the shape it covers.
  static constexpr bool tiles(int rows, int cols, int warps_m) {
    return rows % (16 * warps_m) == 0 && cols % (16 * (kNWarps / warps_m)) == 0;
  }
  static_assert(tiles(kBlockM, kBlockN, kWarpsMSdP), "S/dP warp grid does not divide (kBlockM, kBlockN)");
  static_assert(tiles(kBlockN, kHeadDim, kWarpsNdKV), "dK/dV warp grid does not divide (kBlockN, d)");
  static_assert(tiles(kBlockM, kHeadDim, kWarpsMdQ), "dQ warp grid does not divide (kBlockM, d)");
  using TiledMmaSdP = WarpGrid<kWarpsMSdP>;  // S = Q·Kᵀ and dP = dO·Vᵀ
  // Keys between a thread's consecutive m16n8 tiles of S: the warps along S's keys take turns.
  static constexpr int kSdPKeyStride = 8 * (kNWarps / kWarpsMSdP);
  using TiledMmadKV = WarpGrid<kWarpsNdKV>;  // dV += Pᵀ·dO and dK += dSᵀ·Q
  using TiledMmadQ = WarpGrid<kWarpsMdQ>;    // dQ = dS·K

  using SmemLayoutAtomPdS = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  static_assert(kBlockN % 64 == 0, "P and dS are stored in 64-column chunks");

  using SmemLayoutQ = decltype(tile_to_shape(typename Atoms::SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(typename Atoms::SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutPdS = decltype(tile_to_shape(SmemLayoutAtomPdS{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // Transposed views of the same bytes.
  using SmemLayoutQt = decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutKt = decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutPdSt = decltype(composition(SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV>) * int(sizeof(Element));
  static constexpr int kSmemPdSBytes = int(cosize_v<SmemLayoutPdS>) * int(sizeof(Element));
  // lse, delta and the TokenRanges row range of each row of a query tile.
  static constexpr int kSmemStatsBytes = 2 * kBlockM * int(sizeof(float)) + kBlockM * 4 * int(sizeof(int));
  // Q and dO (with their row statistics) get a second buffer, so that the next query tile loads
  // during the whole current one, where shared memory allows.
  static constexpr int kSmemStageBytes = 2 * kSmemQBytes + kSmemStatsBytes;
  static_assert(kDqAccumRowsMultiple % kBlockM == 0, "dq_accum is allocated in whole query tiles");
  using DqStaging = jax_flash::DqStaging<kBlockM, kHeadDim, kNThreads>;
  static constexpr int kSmemDqBytes = kBulkDq ? DqStaging::kBytes : 0;
  static constexpr int kSmemFixedBytes = 2 * kSmemKVBytes + 2 * kSmemPdSBytes + kSmemDqBytes;  // K, V, P, dS, dQ
  static constexpr bool kDoubleBufferQ = 2 * kSmemStageBytes + kSmemFixedBytes <= kSmemBudgetBytes;
  static constexpr int kQStages = kDoubleBufferQ ? 2 : 1;
  static constexpr int kSmemBytes = kQStages * kSmemStageBytes + kSmemFixedBytes;
  static_assert(kSmemBytes <= kSmemBudgetBytes);
};

}  // namespace jax_flash
