// Row-predicated copies between global and shared memory for tiles that may overhang the
// sequence end. Rows past the end are zero-filled in shared memory (never left stale), and
// never written to global memory.
#pragma once

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

// src, dst: (CPY, CPY_ROWS, CPY_COLS) partitions of one tile; coords: the same partition of the
// tile's identity tensor; rows ≥ num_rows are out of bounds: skipped, and with kZeroFill cleared
// in dst (for shared-memory tiles that the MMAs read whole).
template <bool kZeroFill, typename TiledCopy, typename Src, typename Dst, typename Coords>
__forceinline__ __device__ void copy_rows(TiledCopy const& tiled_copy, Src const& src, Dst& dst, Coords const& coords,
                                          int num_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) < num_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else if constexpr (kZeroFill) {
      clear(dst(_, m, _));
    }
  }
}

}  // namespace jax_flash
