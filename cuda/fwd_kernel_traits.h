// Compile-time description of one forward kernel: tile shape, warp layout of the MMA, shared-memory
// layouts (the atoms and copies come from Sm80Atoms).
#pragma once

#include <cute/tensor.hpp>

#include "sm80_atoms.h"

namespace jax_flash {

using namespace cute;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct FwdKernelTraits : Sm80Atoms<Element_, kHeadDim_, kNWarps_ * 32> {
  using Atoms = Sm80Atoms<Element_, kHeadDim_, kNWarps_ * 32>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kBlockM == 16 * kNWarps * (kBlockM / (16 * kNWarps)), "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of the MMA k-extent");

  // Warps stacked along the query rows, so that each warp owns its rows of S and O and never
  // exchanges partial sums with another warp.
  using TiledMma = TiledMMA<typename Atoms::MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutQ = decltype(tile_to_shape(typename Atoms::SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(typename Atoms::SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V is the B operand of P·V, read transposed: a (kHeadDim, kBlockN) view of the same bytes.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutO = SmemLayoutQ;  // the output tile reuses Q's shared memory

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV>) * int(sizeof(Element));
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;
};

}  // namespace jax_flash
