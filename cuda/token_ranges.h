// Packed sequences (segment ids, varlen): each query row's interval of keys and each key's
// interval of queries (FlashFwdParams::row_ranges, key_ranges), from which a CTA learns which
// tiles hold any visible pair (the rest are skipped) and which need element-wise masking.
#pragma once

#include <climits>
#include <cmath>

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace jax_flash {

using namespace cute;

__forceinline__ __device__ int warp_min(int x) {
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

__forceinline__ __device__ int warp_max(int x) {
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

// Half-open interval of tile indices.
struct TileSpan {
  int begin, end;
};

// What a query tile needs from the key axis: every key a row sees lies in [begin, end); a key
// tile inside [full_begin, full_end) is seen whole by every row (no range masking).
struct QueryTileKeys {
  int begin, end, full_begin, full_end;
};

// Holds only the kernel parameters (which live in the constant bank) and the batch index, so
// that it occupies no registers across the kernels' main loops.
template <int kBlockM, int kBlockN>
struct TokenRanges {
  const FlashFwdParams& params;
  int batch;

  __forceinline__ __device__ bool enabled() const { return params.row_ranges != nullptr; }

  // This batch's row_ranges: (lo, hi, exact, segment) per query row.
  __forceinline__ __device__ const int4* rows() const {
    return reinterpret_cast<const int4*>(params.row_ranges) + int64_t(batch) * params.seqlen_q;
  }

  // The range of query `row` (rows past seqlen_q see nothing).
  __forceinline__ __device__ int4 row(int row) const {
    return row < params.seqlen_q ? rows()[row] : make_int4(0, 0, 1, 0);
  }

  // Summary of the kBlockM rows whose ranges `range_of(r)` gives, computed by each warp alone.
  template <typename RangeOf>
  __forceinline__ __device__ QueryTileKeys query_tile(RangeOf&& range_of) const {
    int begin = INT_MAX, end = INT_MIN, full_begin = INT_MIN, full_end = INT_MAX;
    const int lane = threadIdx.x % 32;
    CUTE_UNROLL
    for (int r = lane; r < kBlockM; r += 32) {
      const int4 range = range_of(r);
      const bool empty = range.x >= range.y;
      if (!empty) {
        begin = min(begin, range.x);
        end = max(end, range.y);
      }
      // An empty or inexact row masks every tile.
      full_begin = max(full_begin, empty || !range.z ? INT_MAX : range.x);
      full_end = min(full_end, range.y);
    }
    return {warp_min(begin), warp_max(end), warp_max(full_begin), warp_min(full_end)};
  }

  __forceinline__ __device__ QueryTileKeys query_tile(int m_block) const {
    return query_tile([&](int r) { return row(m_block * kBlockM + r); });
  }

  static __forceinline__ __device__ TileSpan key_tiles(const QueryTileKeys& t) {
    return t.begin < t.end ? TileSpan{t.begin / kBlockN, (t.end + kBlockN - 1) / kBlockN} : TileSpan{0, 0};
  }

  static __forceinline__ __device__ bool needs_masking(const QueryTileKeys& t, int n_block) {
    return n_block * kBlockN < t.full_begin || (n_block + 1) * kBlockN > t.full_end;
  }

  // The query tiles that see any key of tile n_block (each warp alone).
  __forceinline__ __device__ TileSpan query_tiles(int n_block) const {
    int begin = INT_MAX, end = INT_MIN;
    const int lane = threadIdx.x % 32;
    CUTE_UNROLL
    for (int c = lane; c < kBlockN; c += 32) {
      const int key = n_block * kBlockN + c;
      if (key < params.seqlen_k) {
        const int2 range = reinterpret_cast<const int2*>(params.key_ranges)[int64_t(batch) * params.seqlen_k + key];
        if (range.x < range.y) {
          begin = min(begin, range.x);
          end = max(end, range.y);
        }
      }
    }
    begin = warp_min(begin);
    end = warp_max(end);
    return begin < end ? TileSpan{begin / kBlockM, (end + kBlockM - 1) / kBlockM} : TileSpan{0, 0};
  }

  // Masks the keys outside each row's range (and, for rows whose range is not exact, the keys of
  // other segments). scores, coords: as AttentionMask::apply; range_of(r): the range of tile row r.
  template <typename Scores, typename Coords, typename RangeOf>
  __forceinline__ __device__ void apply(Scores& scores, Coords const& coords, int n_block, RangeOf&& range_of) const {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int4 range = range_of(get<0>(coords(r, 0)));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const int key = n_block * kBlockN + get<1>(coords(0, c));
        bool visible = key >= range.x && key < range.y;
        if (visible && !range.z) visible = params.kv_segment_ids[int64_t(batch) * params.seqlen_k + key] == range.w;
        if (!visible) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace jax_flash
