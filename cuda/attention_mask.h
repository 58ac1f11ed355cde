// Which keys each query may see: the key-sequence tail and, optionally, causal masking aligned to
// the bottom-right corner (query i sees key j iff j <= i + seqlen_k - seqlen_q). Decides which key
// tiles a query tile visits (and which query tiles a key tile meets) and which tile pairs need
// element-wise masking.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

template <int kBlockM, int kBlockN>
struct AttentionMask {
  int seqlen_q;
  int seqlen_k;
  bool is_causal;

  __forceinline__ __device__ int causal_shift() const { return seqlen_k - seqlen_q; }

  // One past the last key tile with any visible key for query tile m_block (≤ 0: none).
  __forceinline__ __device__ int n_block_end(int m_block) const {
    int end = (seqlen_k + kBlockN - 1) / kBlockN;
    if (is_causal) {
      const int last_visible_key = (m_block + 1) * kBlockM - 1 + causal_shift();
      end = min(end, last_visible_key < 0 ? 0 : last_visible_key / kBlockN + 1);
    }
    return end;
  }

  // The first query tile with any visible key in key tile n_block (the backward's loop start).
  __forceinline__ __device__ int m_block_begin(int n_block) const {
    if (!is_causal) return 0;
    const int first_row = n_block * kBlockN - causal_shift();
    return first_row <= 0 ? 0 : first_row / kBlockM;
  }

  // Whether some (query, key) pair of this tile pair is masked.
  __forceinline__ __device__ bool needs_masking(int m_block, int n_block) const {
    const int last_key = (n_block + 1) * kBlockN - 1;
    return last_key >= seqlen_k || (is_causal && last_key > m_block * kBlockM + causal_shift());
  }

  // scores: rows × cols view of the score tile; coords: the same view of (row, col) in the tile.
  template <typename Scores, typename Coords>
  __forceinline__ __device__ void apply(Scores& scores, Coords const& coords, int m_block, int n_block) const {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int row = m_block * kBlockM + get<0>(coords(r, 0));
      const int key_end = is_causal ? min(seqlen_k, row + causal_shift() + 1) : seqlen_k;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        if (n_block * kBlockN + get<1>(coords(0, c)) >= key_end) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace jax_flash
