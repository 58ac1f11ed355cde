// Dropout inside the kernels. Whether a probability is kept is a pure function of the seed and
// its place (batch, head, query, key) — see DropoutOperand — so the backward regenerates the
// forward's mask whatever either pass's tiling, and the XLA path (jax_flash/_dropout.py) draws
// the same one. One Philox call serves the four values a thread holds in an m16n8 accumulator
// tile (query rows r and r + 8, keys c and c + 1), the grouping of every SM80 MMA layout.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

// Philox-2x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011).
__forceinline__ __device__ uint2 philox2x32_10(uint32_t ctr0, uint32_t ctr1, uint32_t key) {
  constexpr uint32_t kMultiplier = 0xD256D193u;
  constexpr uint32_t kWeyl = 0x9E3779B9u;
  CUTE_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi = __umulhi(kMultiplier, ctr0);
    const uint32_t lo = kMultiplier * ctr0;
    ctr0 = hi ^ key ^ ctr1;
    ctr1 = lo;
    key += kWeyl;
  }
  return make_uint2(ctr0, ctr1);
}

// The keep decisions of one (batch, head) and one tile of scores whose first element is query
// first_row, key first_col.
struct DropoutTile {
  uint32_t key, column_xor, row_base, first_col, threshold;

  __forceinline__ __device__ DropoutTile(const FlashFwdParams& params, int batch, int head, int first_row,
                                         int first_col)
      : key(params.dropout.seed[2 * batch]),
        column_xor(params.dropout.seed[2 * batch + 1]),
        row_base(uint32_t(head) * uint32_t(params.seqlen_q) + uint32_t(first_row)),
        first_col(uint32_t(first_col)),
        threshold(params.dropout.threshold) {}

  // Bit v set iff accumulator value v of the m16n8 tile whose value 0 sits at tile coordinates
  // (row, col) is kept: values 0, 1 are (row, col), (row, col + 1); 2, 3 the same keys at row + 8.
  __forceinline__ __device__ uint32_t atom_keep(int row, int col) const {
    const uint2 w = philox2x32_10(row_base + uint32_t(row), ((first_col + uint32_t(col)) >> 1) ^ column_xor, key);
    const uint32_t high = threshold << 16;  // the high half h ≥ threshold iff the word ≥ this
    return uint32_t((w.x & 0xffffu) >= threshold) | uint32_t(w.x >= high) << 1 |
           uint32_t((w.y & 0xffffu) >= threshold) << 2 | uint32_t(w.y >= high) << 3;
  }
};

// Bit i set iff value i of a thread's accumulator fragment ((2, 2), MMA_M, MMA_N) is kept,
// coords holding the tile coordinates of the fragment's values. A loop not unrolled, so that
// Philox's registers are those of one m16n8 tile at a time.
template <typename Coords>
__forceinline__ __device__ uint64_t keep_bits(const Coords& coords, const DropoutTile& tile) {
  static_assert(decltype(size<0>(coords))::value == 4, "expects an m16n8 accumulator fragment");
  constexpr int kTilesM = decltype(size<1>(coords))::value;
  constexpr int kTiles = kTilesM * decltype(size<2>(coords))::value;
  static_assert(4 * kTiles <= 64, "the keep bits of a fragment fill one 64-bit word at most");
  uint64_t bits = 0;
#pragma unroll 1
  for (int t = 0; t < kTiles; ++t) {
    const auto first = coords(0, t % kTilesM, t / kTilesM);
    bits |= uint64_t(tile.atom_keep(get<0>(first), get<1>(first))) << (4 * t);
  }
  return bits;
}

// Values of a fragment whose keep bit is clear become 0.
template <typename Fragment>
__forceinline__ __device__ void apply_keep_bits(Fragment& fragment, uint64_t bits) {
  using T = typename Fragment::value_type;
  CUTE_UNROLL
  for (int i = 0; i < size(fragment); ++i) {
    if (!((bits >> i) & 1u)) fragment(i) = T(0);
  }
}

// Values of a float fragment whose keep bit is clear become 0, kept ones are multiplied by
// `scale`.
template <typename Fragment>
__forceinline__ __device__ void apply_keep_bits(Fragment& fragment, uint64_t bits, float scale) {
  CUTE_UNROLL
  for (int i = 0; i < size(fragment); ++i) fragment(i) = (bits >> i) & 1u ? fragment(i) * scale : 0.f;
}

}  // namespace jax_flash
