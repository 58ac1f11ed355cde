// FlashAttention-2 forward for SM80-class tensor cores. One CTA computes kBlockM query rows of one
// (batch, head): it streams K and V tiles through shared memory (the next tile's cp.async overlaps
// the current tile's math), keeps S = QKᵀ, the online softmax and O = PV in registers, and writes
// O and the row log-sum-exp once at the end.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "alibi.h"
#include "attention_mask.h"
#include "block_gemm.h"
#include "dropout.h"
#include "flash_params.h"
#include "fwd_head_tiles.h"
#include "mask_bias.h"
#include "online_softmax.h"
#include "register_layouts.h"
#include "tile_copy.h"
#include "token_ranges.h"

namespace jax_flash {

using namespace cute;

// kScoreMods: soft-capping, ALiBi, mask, bias and dropout compiled in (a kernel of its own: a
// runtime branch in the tile made ptxas schedule the plain kernel worse, 24% slower at d128 on an
// H200).
template <typename Traits, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kNThreads) flash_fwd_kernel(const __grid_constant__ FlashFwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0);

  extern __shared__ __align__(128) char smem[];

  const int thread_idx = threadIdx.x;
  // Reverse order: under causal masking the last query tiles have the most keys; start them first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;

  const AttentionMask<kBlockM, kBlockN> mask{params};
  const TokenRanges<kBlockM, kBlockN> ranges{params, batch};
  int n_block_begin = mask.n_block_begin(m_block);
  int n_block_end = mask.n_block_end(m_block);
  QueryTileKeys tile_keys{};
  if (ranges.enabled()) {
    tile_keys = ranges.query_tile(m_block);
    const TileSpan span = ranges.key_tiles(tile_keys);
    n_block_begin = max(n_block_begin, span.begin);
    n_block_end = min(n_block_end, span.end);
  }
  const int rows_in_tile = min(kBlockM, params.seqlen_q - m_block * kBlockM);

  // ---- Global tiles of this (batch, head) ----
  // (kBlockM, kHeadDim), (kBlockN, kHeadDim, n) twice, (kBlockM, kHeadDim)
  auto [gQ, gK, gV, gO] = fwd_head_tiles<Element, kBlockM, kBlockN, kHeadDim>(params, batch, head, m_block);
  float* lse_row = lse_row_of(params, batch, head);
  Tensor cQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});   // (kBlockM, kHeadDim) -> (row, col)
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (kBlockN, kHeadDim) -> (row, col)

  typename Traits::GmemTiledCopyStore gmem_copy_o;
  auto gmem_thr_copy_o = gmem_copy_o.get_thread_slice(thread_idx);

  // ---- Query tiles with no visible key: output 0, lse -inf ----
  if (n_block_end <= n_block_begin) {
    Tensor tOgO = gmem_thr_copy_o.partition_D(gO);  // (CPY, CPY_M, CPY_K)
    Tensor tOrO = make_tensor<Element>(shape(tOgO));
    clear(tOrO);
    copy_rows</*kZeroFill=*/false>(gmem_copy_o, tOrO, tOgO, gmem_thr_copy_o.partition_D(cQ), rows_in_tile);
    for (int row = thread_idx; row < rows_in_tile; row += Traits::kNThreads) {
      lse_row[m_block * kBlockM + row] = -INFINITY;
    }
    return;
  }

  // ---- Shared memory ----
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});   // (kBlockN, kHeadDim)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});   // (kBlockN, kHeadDim)
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});             // (kHeadDim, kBlockN)

  typename Traits::GmemTiledCopyAsync gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(thread_idx);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);    // (CPY, CPY_M, CPY_K)
  Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
  Tensor tQcQ = gmem_thr_copy.partition_S(cQ);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);    // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = gmem_thr_copy.partition_D(sK);
  Tensor tVgV = gmem_thr_copy.partition_S(gV);    // (CPY, CPY_N, CPY_K, n)
  Tensor tVsV = gmem_thr_copy.partition_D(sV);
  Tensor tKVcKV = gmem_thr_copy.partition_S(cKV);
  auto keys_in_block = [&](int n_block) { return params.seqlen_k - n_block * kBlockN; };

  // ---- MMA fragments and shared → register copies ----
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // (MMA, MMA_K, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_K)
  clear(acc_o);

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = smem_copy_q.get_thread_slice(thread_idx).partition_S(sQ);
  Tensor tSsK = smem_copy_k.get_thread_slice(thread_idx).partition_S(sK);
  Tensor tOsVt = smem_copy_v.get_thread_slice(thread_idx).partition_S(sVt);

  // (row, col) of every score this thread holds, for masking and for the lse rows.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor score_coords = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));  // (rows, cols)

  Tensor acc_o_rc = acc_rowcol(acc_o);  // (rows, kHeadDim cols)
  OnlineSoftmax<decltype(size<0>(acc_o_rc))::value> softmax;
  const float scale_log2 = params.logit_scale * float(M_LOG2E);
  const float alibi_slope = kScoreMods ? alibi_register_slope(params, batch, head) : 0.f;

  // ---- Prologue: Q and the last visible K tile in flight ----
  int n_block = n_block_end - 1;
  copy_rows</*kZeroFill=*/true>(gmem_copy, tQgQ, tQsQ, tQcQ, rows_in_tile);
  copy_rows</*kZeroFill=*/true>(gmem_copy, tKgK(_, _, _, n_block), tKsK, tKVcKV, keys_in_block(n_block));
  cp_async_fence();

  // ---- Main loop over the visible key tiles, last to first: under causal masking the masked
  // tiles come first ----
  auto process_key_tile = [&](int n_block, auto needs_mask) {
    // Dropout's keep bits are drawn first, while only acc_o holds registers (drawn next to their
    // use, they made ptxas spill up to 1 KiB more).
    const uint64_t keep = kScoreMods && params.dropout.seed != nullptr
                              ? keep_bits</*kKeyStride=*/8>(tScS, DropoutTile(params, batch, head, m_block * kBlockM, n_block * kBlockN))
                              : 0;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    Tensor scores = acc_rowcol(acc_s);  // (rows, kBlockN cols)
    if (kScoreMods && params.bias.data != nullptr) {
      fill_with_bias(scores, score_coords, params, batch, head, m_block * kBlockM, n_block * kBlockN);
    } else {
      clear(acc_s);
    }
    cp_async_wait<0>();
    __syncthreads();  // K[n_block] landed; every warp is done with V[n_block + 1]
    copy_rows</*kZeroFill=*/true>(gmem_copy, tVgV(_, _, _, n_block), tVsV, tKVcKV, keys_in_block(n_block));
    cp_async_fence();

    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, thread_idx);
    // The bias (already in the scores), the cap and ALiBi go before the masks, which then write
    // -inf over the scores they hide. Each is a uniform branch: one off costs the others nothing
    // per score.
    if constexpr (kScoreMods) {
      if (params.softcap > 0.f) softcap_scores(scores, params.softcap_exp2_scale);
      if (alibi_slope != 0.f) {
        const int diagonal = m_block * kBlockM - n_block * kBlockN + params.seqlen_k - params.seqlen_q;
        add_alibi(scores, alibi_distances(score_coords, diagonal), alibi_slope);
      }
      if (params.mask.bits != nullptr) {
        apply_mask_bits<kBlockN>(scores, score_coords, params, batch, head, m_block * kBlockM, n_block * kBlockN);
      }
    }
    if constexpr (decltype(needs_mask)::value) {
      mask.apply(scores, score_coords, m_block, n_block);
      if (ranges.enabled()) {
        ranges.apply(scores, score_coords, n_block, [&](int r) { return ranges.row(m_block * kBlockM + r); });
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n_block] landed; every warp is done with K[n_block]
    if (n_block > n_block_begin) {
      copy_rows</*kZeroFill=*/true>(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK, tKVcKV, keys_in_block(n_block - 1));
      cp_async_fence();
    }

    softmax.update(scores, acc_o_rc, scale_log2);
    Tensor p = convert_fragment<Element>(acc_s);
    // Dropout after the row sums, which count every probability.
    if (kScoreMods && params.dropout.seed != nullptr) apply_keep_bits(p, keep);
    Tensor tOrP = make_tensor(p.data(), acc_to_a_operand_layout(p.layout()));  // (MMA, MMA_M, MMA_K)
    gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, thread_idx);
  };
  for (; n_block >= n_block_begin; --n_block) {
    if constexpr (kScoreMods) {
      // A key tile the mask hides entirely only passes the next K tile on (once K[n_block]
      // landed, every warp is done with it and with V[n_block + 1]).
      if (params.mask.bits != nullptr) {
        cp_async_wait<0>();
        if (!mask_tile_visible<kBlockM, kBlockN, Traits::kNThreads>(params, batch, head, m_block * kBlockM,
                                                                     n_block * kBlockN)) {
          if (n_block > n_block_begin) {
            copy_rows</*kZeroFill=*/true>(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK, tKVcKV,
                                          keys_in_block(n_block - 1));
            cp_async_fence();
          }
          continue;
        }
      }
      // One instantiation of the tile, so that it is inlined (two made ptxas keep the loop's
      // tensors on the stack): the masks' checks are cheap next to the score mods.
      process_key_tile(n_block, true_type{});
    } else if (mask.needs_masking(m_block, n_block) ||
               (ranges.enabled() && ranges.needs_masking(tile_keys, n_block))) {
      process_key_tile(n_block, true_type{});
    } else {
      process_key_tile(n_block, false_type{});
    }
  }

  // ---- Epilogue: normalize, stage O through shared memory (Q's, now unused), store ----
  Tensor lse = softmax.finalize(acc_o_rc, params.logit_scale);
  if (kScoreMods && params.dropout.seed != nullptr) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= params.dropout.keep_scale;
  }
  if (get<1>(score_coords(0, 0)) == 0) {  // one thread of each quad writes its rows' lse
    CUTE_UNROLL
    for (int r = 0; r < size(lse); ++r) {
      const int row = get<0>(score_coords(r, 0));
      if (row < rows_in_tile) lse_row[m_block * kBlockM + row] = lse(r);
    }
  }

  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutO{});  // (kBlockM, kHeadDim)
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, tiled_mma);
  auto smem_thr_copy_o = smem_copy_o.get_thread_slice(thread_idx);
  copy(smem_copy_o, smem_thr_copy_o.retile_S(rO), smem_thr_copy_o.partition_D(sO));
  __syncthreads();

  Tensor tOsO = gmem_thr_copy_o.partition_S(sO);  // (CPY, CPY_M, CPY_K)
  Tensor tOgO = gmem_thr_copy_o.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
  copy_rows</*kZeroFill=*/false>(gmem_copy_o, tOrO, tOgO, gmem_thr_copy_o.partition_D(cQ), rows_in_tile);
}

}  // namespace jax_flash
