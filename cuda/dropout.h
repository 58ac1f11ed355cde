// Dropout inside the kernels. Whether a probability is kept is a pure function of the seed and
// its place (batch, head, query, key) — see DropoutOperand — so the backward regenerates the
// forward's mask whatever either pass's tiling, and the XLA path (jax_flash/_dropout.py) draws
// the same one. One Philox call gives the 8 bytes of queries i, i + 8 and keys j, j + 1,
// j + 32, j + 33: two m16n8 accumulator tiles 32 keys apart, which one thread holds in every
// warp layout of the kernels (each thread holds rows r, r + 8 and keys c, c + 1 of an m16n8 tile;
// the key tiles are multiples of 64, and warps split them in steps of 8, 16 or 32).
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
// first_row, key first_col (a multiple of 64).
struct DropoutTile {
  uint32_t key, column_xor, row_base, first_col, thresholds;

  __forceinline__ __device__ DropoutTile(const FlashFwdParams& params, int batch, int head, int first_row,
                                         int first_col)
      : key(params.dropout.seed[2 * batch]),
        column_xor(params.dropout.seed[2 * batch + 1]),
        row_base(uint32_t(head) * uint32_t(params.seqlen_q) + uint32_t(first_row)),
        first_col(uint32_t(first_col)),
        thresholds(params.dropout.threshold * 0x01010101u) {}

  // The keep bits of the m16n8 tile whose value 0 sits at tile coordinates (row, col), col % 64
  // < 32 (bits 0-3), and of the one 32 keys on (bits 4-7): bit v for value v, values 0, 1 being
  // (row, col), (row, col + 1) and 2, 3 the same keys at row + 8.
  __forceinline__ __device__ uint32_t atom_pair_keep(int row, int col) const {
    const uint32_t key_pair = first_col + uint32_t(col);
    const uint2 w = philox2x32_10(row_base + uint32_t(row), ((key_pair >> 6) << 4 | (key_pair & 31) >> 1) ^ column_xor,
                                  key);
    // Bytes ≥ threshold become 0xff; a word's bytes are keys j, j + 1, j + 32, j + 33.
    const uint32_t upper = __vcmpgeu4(w.x, thresholds), lower = __vcmpgeu4(w.y, thresholds);
    return (upper & 1u) | (upper >> 7 & 2u) | (lower << 2 & 4u) | (lower >> 5 & 8u) |
           (upper >> 12 & 16u) | (upper >> 19 & 32u) | (lower >> 10 & 64u) | (lower >> 17 & 128u);
  }
};

// Bit i set iff value i of a thread's accumulator fragment ((2, 2), MMA_M, MMA_N) is kept,
// coords holding the tile coordinates of the fragment's values, whose consecutive m16n8 tiles
// along N are kKeyStride keys apart. A loop not unrolled, so that Philox's registers are those
// of one call at a time.
template <int kKeyStride, typename Coords>
__forceinline__ __device__ uint64_t keep_bits(const Coords& coords, const DropoutTile& tile) {
  static_assert(decltype(size<0>(coords))::value == 4, "expects an m16n8 accumulator fragment");
  constexpr int kTilesM = decltype(size<1>(coords))::value;
  constexpr int kTilesN = decltype(size<2>(coords))::value;
  static_assert(4 * kTilesM * kTilesN <= 64, "the keep bits of a fragment fill one 64-bit word at most");
  static_assert(32 % kKeyStride == 0 && kKeyStride * kTilesN % 64 == 0,
                "a thread must hold both tiles of each pair 32 keys apart");
  constexpr int kPartner = 32 / kKeyStride;  // the fragment's tile 32 keys on, along N
  uint64_t bits = 0;
#pragma unroll 1
  for (int t = 0; t < kTilesM * kTilesN; ++t) {
    const int m = t % kTilesM, n = t / kTilesM;
    const auto first = coords(0, m, n);
    if (get<1>(first) & 32) continue;  // the partner of a tile 32 keys before
    const uint64_t pair = tile.atom_pair_keep(get<0>(first), get<1>(first));
    bits |= (pair & 15u) << (4 * t) | (pair >> 4) << (4 * (t + kPartner * kTilesM));
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
