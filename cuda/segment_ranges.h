// Packed sequences: FlashFwdParams::row_ranges and key_ranges (see token_ranges.h) built from
// segment ids on the GPU in O(seqlen). A hash table per batch row maps each segment id to the
// first and last index of its tokens and how many runs they form; each query row then takes its
// segment's keys, cut by the band, and each key its segment's queries.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace jax_flash {

struct SegmentRangesParams {
  const int* q_ids;   // [batch, seqlen_q]; < 0: padding, which sees nothing and is seen by nothing
  const int* kv_ids;  // [batch, seqlen_k]
  // [batch, seqlen] positions (flash_attention_varlen's layout), or nullptr for i + seqlen_k −
  // seqlen_q and j. With positions every segment must be contiguous and its positions
  // non-decreasing (true of varlen's layout).
  const int* q_pos;
  const int* kv_pos;
  int batch, seqlen_q, seqlen_k;
  // Query i sees key j of its segment iff pos_j − pos_i ∈ [−window_left, window_right]; < 0:
  // unbounded (causal is window_right = 0).
  int window_left, window_right;
  // Results. row_ranges[i] = (lo, hi, exact, segment): every key row i sees lies in [lo, hi),
  // (0, 0) if none; exact = 1 when all of [lo, hi) is its segment's (the row's segment is
  // contiguous in kv), else the kernels also compare kv_segment_ids there. key_ranges[j] =
  // (qlo, qhi): every query that sees key j lies in [qlo, qhi).
  int4* row_ranges;  // [batch, seqlen_q]
  int2* key_ranges;  // [batch, seqlen_k]
  int* workspace;    // segment_ranges_workspace_ints(batch, seqlen_q, seqlen_k) ints, any content
};

// Size of the workspace: the hash tables of the query and key segments.
int64_t segment_ranges_workspace_ints(int batch, int seqlen_q, int seqlen_k);

cudaError_t run_segment_ranges(const SegmentRangesParams& params, cudaStream_t stream);

}  // namespace jax_flash
