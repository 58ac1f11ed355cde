// Plain-old-data parameters of the attention kernels. No JAX, XLA or Python here:
// the bindings fill this struct from XLA buffers, the kernels read it.
#pragma once

#include <cstdint>

namespace jax_flash {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };
enum class BiasDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A bias broadcastable to [batch, num_heads, seqlen_q, seqlen_k]: strides in elements, 0 along the
// dimensions it broadcasts over. data nullptr: no bias.
struct BiasOperand {
  const void* data;
  int64_t batch_stride, head_stride, row_stride, col_stride;
  BiasDType dtype;
};

// A boolean mask as bits, [batch | 1, num_heads | 1, seqlen_q | 1, words] uint32: key j of a row
// is visible iff bit j % 32 of word j / 32 is set; words = seqlen_k rounded up to a multiple of
// kMaskRowKeys, over 32 (the padding bits 0). Strides in words, 0 along broadcast dimensions.
// bits nullptr: no mask.
struct PackedMask {
  const uint32_t* bits;
  int64_t batch_stride, head_stride, row_stride;
};
// Keys per row of a PackedMask are a multiple of this, a multiple of every key tile.
constexpr int kMaskRowKeys = 128;

// Dropout. The probability of query i, key j in head h of batch entry b is kept iff byte
// 2·((j >> 5) & 1) + (j & 1) of word (i >> 3) & 1 of Philox-2x32-10 with key seed[b][0] and
// counter (h·seqlen_q + i with bit 3 cleared, (⌊j / 64⌋·16 + ⌊(j mod 32) / 2⌋) xor seed[b][1])
// (mod 2³²) is ≥ threshold; the kept ones are scaled by keep_scale = 256 / (256 − threshold), so
// the rate is threshold / 256. seed nullptr: no dropout.
struct DropoutOperand {
  const uint32_t* seed;  // [batch, 2]
  uint32_t threshold;    // in [0, 255]
  float keep_scale;      // derived by run_flash_fwd and run_flash_bwd (callers leave it)
};

// Forward pass over tensors laid out [batch, seqlen, heads, head_dim] (strides in elements,
// the last dimension contiguous) and lse laid out [batch, heads, seqlen_q] contiguous.
struct FlashFwdParams {
  const void* q;    // [batch, seqlen_q, num_heads, head_dim]
  const void* k;    // [batch, seqlen_k, num_heads_k, head_dim]
  const void* v;    // [batch, seqlen_k, num_heads_k, head_dim]
  void* out;        // [batch, seqlen_q, num_heads, head_dim]
  float* lse;       // [batch, num_heads, seqlen_q]

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;

  int batch;
  int seqlen_q;
  int seqlen_k;
  int num_heads;
  int num_heads_k;  // divides num_heads; query head h reads kv head h / (num_heads / num_heads_k)
  int head_dim;     // one of kSupportedHeadDims; callers pad other sizes

  float softmax_scale;
  // Soft-capping (Gemma 2): > 0 turns the scaled scores s into softcap · tanh(s / softcap) before
  // the masks; 0 leaves them.
  float softcap;
  // Derived from softmax_scale and softcap by run_flash_fwd and run_flash_bwd (callers leave
  // them), so that the kernels read them from the constant bank: computed in the kernels, they
  // were hoisted out of the main loops into registers, and ptxas spilled 16 more bytes in the
  // forward and 20 in the backward.
  // logit_scale turns the score registers into logits: softmax_scale, or softcap when capping
  // (the registers then hold t = tanh(softmax_scale·s / softcap); see softcap_scores).
  float logit_scale;
  // 2·log2(e)·softmax_scale / softcap (0 without softcap): t is tanh_from_2y_log2e of a raw score
  // times this.
  float softcap_exp2_scale;
  // The band of visible keys, aligned to the bottom-right corner: key j is visible to query i iff
  // i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right, each
  // bound dropped when its value is negative (causal: window_right = 0).
  int window_left;
  int window_right;
  DType dtype;

  // ALiBi: float32 slopes [batch, num_heads] (contiguous), else nullptr. The logits of query i
  // and key j get −slope·|i + seqlen_k − seqlen_q − j| (after the cap, before the masks).
  const float* alibi_slopes;

  // Keys where mask is false are hidden; bias is added to the logits (not with softcap), before
  // the masks. The forward skips the tiles the mask hides entirely, and so does the backward but
  // in deterministic mode.
  PackedMask mask;
  BiasOperand bias;
  DropoutOperand dropout;

  // Packed sequences (segment ids, varlen), else nullptr. Key j is visible to query i only if
  // lo <= j < hi for row_ranges[b, i] = (lo, hi, exact, segment), and, unless exact, only if
  // kv_segment_ids[b, j] == segment; every query that sees key j lies in key_ranges[b, j] =
  // (first, end). Contiguous int32 arrays; they let the kernels skip tiles outside the ranges.
  const int* row_ranges;      // [batch, seqlen_q, 4]
  const int* key_ranges;      // [batch, seqlen_k, 2] (the backward's)
  const int* kv_segment_ids;  // [batch, seqlen_k]
};

// Whether any score modifier is on: softcap, ALiBi, mask, bias or dropout (the forward kernels
// compiled with them, kScoreMods, run those; the Hopper forward has none).
inline bool has_score_mods(const FlashFwdParams& p) {
  return p.softcap > 0.f || p.alibi_slopes != nullptr || p.mask.bits != nullptr || p.bias.data != nullptr ||
         p.dropout.seed != nullptr;
}

// Backward pass. The forward's fields describe q, k, v and lse (out is not read); dout is laid out
// like out. dk and dv are per query head: under GQA the caller sums each group's heads.
struct FlashBwdParams {
  FlashFwdParams fwd;
  const void* dout;     // [batch, seqlen_q, num_heads, head_dim], strides of out
  const float* delta;   // [batch, num_heads, seqlen_q]: rowsum(dout ∘ out) − dlse
  void* dq;             // [batch, seqlen_q, num_heads, head_dim], strides of q: softmax_scale · Σ dS·K
  float* dq_accum;      // workspace [batch, num_heads, round_up(seqlen_q, kDqAccumRowsMultiple), head_dim],
                        // zeroed: Σ dS·K, each query tile's block in the order of the kernel that runs (the
                        // SM80 family's: as its threads hold the values; the Hopper one's: rows)
  void* dk;             // [batch, seqlen_k, num_heads, head_dim]
  void* dv;             // [batch, seqlen_k, num_heads, head_dim], strides of dk
  int64_t dkv_batch_stride, dkv_row_stride, dkv_head_stride;
  // Deterministic mode: [batch, num_heads, ceil(seqlen_q / kDqSemaphoreRowsPerCounter)] zeroed
  // counters that make the key tiles add into each query tile's dq_accum in a fixed order.
  // nullptr: atomics in any order.
  int* dq_semaphore;
  // With ALiBi: [batch, num_heads, ceil(seqlen_k / kAlibiPartialKeys)], zero-filled by the caller,
  // who sums the last axis into dalibi_slopes: entry n gets key tile n's Σ dS·(−|i + sk − sq − j|)
  // (dS the gradient of the logits), one write per CTA in a fixed order, so deterministic. Key
  // tiles wider than kAlibiPartialKeys leave the entries past theirs at 0. nullptr without ALiBi.
  float* dalibi_partial;
  // With a bias: float32 in the bias's shape (fwd.bias's strides), zero-filled by the caller, gets
  // the bias's gradient Σ dS over its broadcast dimensions (atomically where it broadcasts, so
  // not deterministic then). nullptr without a bias, or when nothing uses its gradient.
  float* dbias;
  bool dbias_atomic;  // derived by run_flash_bwd (callers leave it): the bias broadcasts
};

// Keys per dalibi_partial entry: the narrowest backward key tile.
constexpr int kAlibiPartialKeys = 64;
constexpr int64_t alibi_partials(int64_t seqlen_k) { return (seqlen_k + kAlibiPartialKeys - 1) / kAlibiPartialKeys; }

// Query rows per dq_semaphore counter: at most the smallest query tile of any backward kernel.
constexpr int kDqSemaphoreRowsPerCounter = 16;
// dq_accum rows are allocated in multiples of this, a multiple of every backward query tile.
constexpr int kDqAccumRowsMultiple = 128;
constexpr int64_t dq_accum_rows(int64_t seqlen_q) {
  return (seqlen_q + kDqAccumRowsMultiple - 1) / kDqAccumRowsMultiple * kDqAccumRowsMultiple;
}

}  // namespace jax_flash
