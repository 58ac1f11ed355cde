// Which keys each query may see: the key-sequence tail and a band aligned to the bottom-right
// corner (causal and sliding windows; see FlashFwdParams). Decides which key tiles a query tile
// visits (and which query tiles a key tile meets) and which tile pairs need element-wise masking.
#pragma once

#include <climits>
#include <cmath>

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

// Reads the kernel parameters (in the constant bank) where it needs them, so that it occupies no
// registers across the kernels' main loops.
template <int kBlockM, int kBlockN>
struct AttentionMask {
  const FlashFwdParams& params;

  __forceinline__ __device__ int seqlen_q() const { return params.seqlen_q; }
  __forceinline__ __device__ int seqlen_k() const { return params.seqlen_k; }
  __forceinline__ __device__ int window_left() const { return params.window_left; }    // < 0: unbounded
  __forceinline__ __device__ int window_right() const { return params.window_right; }  // < 0: unbounded

  __forceinline__ __device__ int shift() const { return seqlen_k() - seqlen_q(); }
  __forceinline__ __device__ int num_n_blocks() const { return (seqlen_k() + kBlockN - 1) / kBlockN; }
  __forceinline__ __device__ int num_m_blocks() const { return (seqlen_q() + kBlockM - 1) / kBlockM; }

  // Key tiles [n_block_begin, n_block_end) hold every key visible to query tile m_block.
  __forceinline__ __device__ int n_block_begin(int m_block) const {
    if (window_left() < 0) return 0;
    const int first_key = m_block * kBlockM + shift() - window_left();
    return first_key <= 0 ? 0 : first_key / kBlockN;
  }
  __forceinline__ __device__ int n_block_end(int m_block) const {
    if (window_right() < 0) return num_n_blocks();
    const int last_key = (m_block + 1) * kBlockM - 1 + shift() + window_right();
    return last_key < 0 ? 0 : min(num_n_blocks(), last_key / kBlockN + 1);
  }

  // Query tiles [m_block_begin, m_block_end) hold every query that sees a key of tile n_block:
  // exactly the tiles whose [n_block_begin, n_block_end) contains n_block.
  __forceinline__ __device__ int m_block_begin(int n_block) const {
    if (window_right() < 0) return 0;
    const int first_row = n_block * kBlockN - shift() - window_right();
    return first_row <= 0 ? 0 : first_row / kBlockM;
  }
  __forceinline__ __device__ int m_block_end(int n_block) const {
    if (window_left() < 0) return num_m_blocks();
    const int last_row = (n_block + 1) * kBlockN - 1 - shift() + window_left();
    return last_row < 0 ? 0 : min(num_m_blocks(), last_row / kBlockM + 1);
  }

  // Whether some (query, key) pair of this tile pair is masked.
  __forceinline__ __device__ bool needs_masking(int m_block, int n_block) const {
    const int first_key = n_block * kBlockN, last_key = first_key + kBlockN - 1;
    const int first_diagonal = m_block * kBlockM + shift(), last_diagonal = first_diagonal + kBlockM - 1;
    return last_key >= seqlen_k() || (window_right() >= 0 && last_key > first_diagonal + window_right()) ||
           (window_left() >= 0 && first_key < last_diagonal - window_left());
  }

  // scores: rows × cols view of the score tile; coords: the same view of (row, col) in the tile.
  template <typename Scores, typename Coords>
  __forceinline__ __device__ void apply(Scores& scores, Coords const& coords, int m_block, int n_block) const {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int diagonal = m_block * kBlockM + get<0>(coords(r, 0)) + shift();
      const int key_begin = window_left() < 0 ? INT_MIN : diagonal - window_left();
      const int key_end = window_right() < 0 ? seqlen_k() : min(seqlen_k(), diagonal + window_right() + 1);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const int key = n_block * kBlockN + get<1>(coords(0, c));
        if (key < key_begin || key >= key_end) scores(r, c) = -INFINITY;
      }
    }
  }

  // The same on a transposed tile (rows are keys, columns queries; the Hopper backward's Sᵀ),
  // its first row key first_key and first column query first_query.
  template <typename Scores, typename Coords>
  __forceinline__ __device__ void apply_transposed(Scores& scores, Coords const& coords, int first_key,
                                                   int first_query) const {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const int diagonal = first_query + get<1>(coords(0, c)) + shift();
      const int key_begin = window_left() < 0 ? INT_MIN : diagonal - window_left();
      const int key_end = window_right() < 0 ? seqlen_k() : min(seqlen_k(), diagonal + window_right() + 1);
      CUTE_UNROLL
      for (int r = 0; r < size<0>(scores); ++r) {
        const int key = first_key + get<0>(coords(r, 0));
        if (key < key_begin || key >= key_end) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace jax_flash
