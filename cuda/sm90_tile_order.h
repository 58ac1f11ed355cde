// Order in which the Hopper backward's CTAs, one key tile of one (batch, head) pair each, are
// dispatched. The grid is one-dimensional and the hardware starts its CTAs in index order as SMs
// come free.
//
// The pairs go in sections; within a section every pair's rank-0 tile (the heaviest under its mask)
// first, then every pair's rank 1, and so on. With one pair per section the last pairs of a causal
// grid start their heaviest tiles when little else is left (CTA traces of the forward in that
// order put the last SM's end at 1.07-1.13x the SMs' mean busy time at 4k). So a section holds
// at least kMinCtas CTAs, and more pairs while what each pair streams (Q, dO and dq_accum) stays
// within kSectionBytes of L2. Grids of equal tiles keep one pair per section: nothing to balance,
// and each pair's tiles share its operands in L2 at once. (The forward orders its CTAs by its 3-D
// grid alone: read through this order it measured 4-9% slower at head dims 64 and 128 even where
// the order was the same, its main loop scheduled differently by ptxas; see benchmarks/NOTES.md.)
#pragma once

#include <cstdint>

namespace jax_flash {

struct Sm90Tile {
  int rank, head, batch;  // rank 0: the pair's first tile dispatched
};

// Built on the host per launch, read by the kernel from its arguments.
struct Sm90TileOrder {
  int tiles_per_pair;
  int num_heads;
  int num_pairs;          // batch · num_heads
  int pairs_per_section;  // the last section may hold fewer

  static constexpr int64_t kSectionBytes = int64_t(16) << 20;
  static constexpr int kMinCtas = 256;

  static Sm90TileOrder make(int tiles_per_pair, int batch, int num_heads, int64_t bytes_per_pair, bool equal_tiles) {
    Sm90TileOrder order{tiles_per_pair, num_heads, batch * num_heads, 1};
    if (!equal_tiles) {
      const int64_t fit = bytes_per_pair > 0 ? kSectionBytes / bytes_per_pair : order.num_pairs;
      const int64_t balanced = (kMinCtas + tiles_per_pair - 1) / tiles_per_pair;
      const int64_t pairs = fit > balanced ? fit : balanced;
      order.pairs_per_section = int(pairs < order.num_pairs ? pairs : order.num_pairs);
    }
    return order;
  }

  int64_t num_ctas() const { return int64_t(tiles_per_pair) * num_pairs; }

  __forceinline__ __device__ Sm90Tile at(int cta) const {
    const int section_ctas = pairs_per_section * tiles_per_pair;
    const int section = cta / section_ctas;
    const int first_pair = section * pairs_per_section;
    const int section_pairs = min(pairs_per_section, num_pairs - first_pair);
    const int index = cta - section * section_ctas;
    const int rank = index / section_pairs;
    const int pair = first_pair + index - rank * section_pairs;
    const int batch = pair / num_heads;
    return {rank, pair - batch * num_heads, batch};
  }
};

}  // namespace jax_flash
