// FlashAttention-2 backward for SM80-class tensor cores. One CTA owns kBlockN keys of one
// (batch, head): it keeps dK and dV in registers while it walks the query tiles that see those
// keys, recomputes P from the saved lse (the S×S matrix never exists), and adds each query tile's
// share of dQ into a float32 buffer, with atomics (or, in deterministic mode, in key-tile order).
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "alibi.h"
#include "attention_mask.h"
#include "block_gemm.h"
#include "dq_accumulate.h"
#include "dropout.h"
#include "flash_params.h"
#include "mask_bias.h"
#include "online_softmax.h"
#include "register_layouts.h"
#include "tile_copy.h"
#include "token_ranges.h"

namespace jax_flash {

using namespace cute;

template <typename Traits>
__forceinline__ __device__ void flash_bwd_key_tile(const FlashBwdParams& params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr bool kDoubleBufferQ = Traits::kDoubleBufferQ;
  static_assert(kBlockM >= kDqSemaphoreRowsPerCounter, "one dq_semaphore counter per query tile at most");
  const FlashFwdParams& p = params.fwd;

  extern __shared__ __align__(128) char smem[];
  const int thread_idx = threadIdx.x;
  const int n_block = blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int head_k = head / (p.num_heads / p.num_heads_k);

  const AttentionMask<kBlockM, kBlockN> mask{p};
  const TokenRanges<kBlockM, kBlockN> ranges{p, batch};
  int m_begin = mask.m_block_begin(n_block);
  int m_end = mask.m_block_end(n_block);
  // Deterministic mode adds dQ in the order of the band's key tiles, so every one of them must
  // visit its query tiles: the ranges then only mask.
  if (ranges.enabled() && params.dq_semaphore == nullptr) {
    const TileSpan span = ranges.query_tiles(n_block);
    m_begin = max(m_begin, span.begin);
    m_end = min(m_end, span.end);
  }
  const int keys_in_tile = min(kBlockN, p.seqlen_k - n_block * kBlockN);

  // ---- Global tensors of this (batch, head) ----
  auto rows_of = [&](const void* base, int64_t batch_stride, int64_t head_offset, int64_t row_stride, int seqlen) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(base) + batch * batch_stride + head_offset),
                       make_shape(seqlen, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor mQ = rows_of(p.q, p.q_batch_stride, head * p.q_head_stride, p.q_row_stride, p.seqlen_q);
  Tensor mdO = rows_of(params.dout, p.out_batch_stride, head * p.out_head_stride, p.out_row_stride, p.seqlen_q);
  Tensor mK = rows_of(p.k, p.k_batch_stride, head_k * p.k_head_stride, p.k_row_stride, p.seqlen_k);
  Tensor mV = rows_of(p.v, p.v_batch_stride, head_k * p.v_head_stride, p.v_row_stride, p.seqlen_k);
  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));    // (kBlockM, d, m)
  Tensor gdO = local_tile(mdO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));  // (kBlockM, d, m)
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));  // (kBlockN, d)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));  // (kBlockN, d)
  const int64_t stats_offset = (int64_t(batch) * p.num_heads + head) * p.seqlen_q;
  const float* lse_row = p.lse + stats_offset;
  const float* delta_row = params.delta + stats_offset;
  float* dq_accum = params.dq_accum + (int64_t(batch) * p.num_heads + head) * dq_accum_rows(p.seqlen_q) * kHeadDim;

  // ---- Shared memory: Q and dO (kQStages each), K, V, P, dS ----
  using SmemLayoutQ = typename Traits::SmemLayoutQ;
  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_do = smem_q + Traits::kQStages * cosize_v<SmemLayoutQ>;
  Tensor sK = make_tensor(make_smem_ptr(smem_do + Traits::kQStages * cosize_v<SmemLayoutQ>), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutPdS{});   // (kBlockM, kBlockN)
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutPdS{});  // (kBlockM, kBlockN)
  // Each stage's query rows: lse and delta [stage][lse, delta][kBlockM], then their ranges
  // [stage][kBlockM] (with TokenRanges).
  float* smem_stats = reinterpret_cast<float*>(raw_pointer_cast(sdS.data() + size(sdS)));
  int4* smem_row_ranges = reinterpret_cast<int4*>(smem_stats + Traits::kQStages * 2 * kBlockM);
  const typename Traits::DqStaging dq_staging{reinterpret_cast<float*>(smem_row_ranges + Traits::kQStages * kBlockM)};  // SM90 only
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKt{});              // (d, kBlockN)
  Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPdSt{});            // (kBlockN, kBlockM)
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPdSt{});          // (kBlockN, kBlockM)
  // One stage of the Q or dO buffer: (kBlockM, d), and its (d, kBlockM) view.
  auto q_stage = [&](Element* base, int stage) {
    return make_tensor(make_smem_ptr(base + stage * cosize_v<SmemLayoutQ>), SmemLayoutQ{});
  };
  auto q_stage_t = [&](Element* base, int stage) {
    return make_tensor(make_smem_ptr(base + stage * cosize_v<SmemLayoutQ>), typename Traits::SmemLayoutQt{});
  };

  typename Traits::GmemTiledCopyAsync gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(thread_idx);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);     // (CPY, CPY_M, CPY_K, m)
  Tensor tdOgdO = gmem_thr_copy.partition_S(gdO);  // (CPY, CPY_M, CPY_K, m)
  Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  // ---- MMAs and the ldmatrix copies that feed them ----
  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadKV mma_dkv;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(thread_idx);
  auto thr_dkv = mma_dkv.get_thread_slice(thread_idx);
  auto thr_dq = mma_dq.get_thread_slice(thread_idx);
  auto ldsm_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto ldsm_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto ldsm_at_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto ldsm_bt_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto ldsm_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
  auto ldsm_bt_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);

  Tensor sQ0 = q_stage(smem_q, 0);
  Tensor sQt0 = q_stage_t(smem_q, 0);
  Tensor sdO0 = q_stage(smem_do, 0);
  Tensor sdOt0 = q_stage_t(smem_do, 0);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ0);       // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);        // (MMA, MMA_N, MMA_K)
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO0);    // (MMA, MMA_M, MMA_K)
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);       // (MMA, MMA_N, MMA_K)
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);     // (MMA, MMA_N, MMA_K=M)
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt0);  // (MMA, MMA_D, MMA_K=M)
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);   // (MMA, MMA_N, MMA_K=M)
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt0);    // (MMA, MMA_D, MMA_K=M)
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);      // (MMA, MMA_M, MMA_K=N)
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);      // (MMA, MMA_D, MMA_K=N)
  Tensor tSsK = ldsm_b_sdp.get_thread_slice(thread_idx).partition_S(sK);
  Tensor tdPsV = ldsm_b_sdp.get_thread_slice(thread_idx).partition_S(sV);
  Tensor tdVsPt = ldsm_at_dkv.get_thread_slice(thread_idx).partition_S(sPt);
  Tensor tdKsdSt = ldsm_at_dkv.get_thread_slice(thread_idx).partition_S(sdSt);
  Tensor tdQsdS = ldsm_a_dq.get_thread_slice(thread_idx).partition_S(sdS);
  Tensor tdQsKt = ldsm_bt_dq.get_thread_slice(thread_idx).partition_S(sKt);

  auto store_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_sdp);
  auto thr_store_pds = store_pds.get_thread_slice(thread_idx);
  Tensor tPsP = thr_store_pds.partition_D(sP);
  Tensor tdSsdS = thr_store_pds.partition_D(sdS);

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (MMA, MMA_N, MMA_D)
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (MMA, MMA_N, MMA_D)
  clear(acc_dk);
  clear(acc_dv);

  // (row, col) in the tile of every S/dP and dQ element this thread holds, as rows × cols.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coords_s = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  const float scale_log2 = p.logit_scale * float(M_LOG2E);
  const auto dalibi_sums = DalibiWarpSums<Traits::kNWarps>::zeroed();

  // ---- Prologue: K and V once, the first query tile ----
  Tensor tKsK = gmem_thr_copy.partition_D(sK);
  Tensor tVsV = gmem_thr_copy.partition_D(sV);
  copy_whole_rows(gmem_copy, gmem_thr_copy.partition_S(gK), tKsK, tKVcKV, keys_in_tile);
  copy_whole_rows(gmem_copy, gmem_thr_copy.partition_S(gV), tVsV, tKVcKV, keys_in_tile);
  auto load_query_tile = [&](int m_block, int stage) {
    const int rows = p.seqlen_q - m_block * kBlockM;
    Tensor tQsQ = gmem_thr_copy.partition_D(q_stage(smem_q, stage));
    Tensor tdOsdO = gmem_thr_copy.partition_D(q_stage(smem_do, stage));
    copy_whole_rows(gmem_copy, tQgQ(_, _, _, m_block), tQsQ, tQcQ, rows);
    copy_whole_rows(gmem_copy, tdOgdO(_, _, _, m_block), tdOsdO, tQcQ, rows);
    // The row statistics travel with the tile, so the loop never waits on a global load. Rows
    // past seqlen_q get lse -inf and delta 0.
    static_assert(kBlockM <= Traits::kNThreads);
    if (thread_idx < kBlockM) {
      float* stats = smem_stats + stage * 2 * kBlockM + thread_idx;
      if (thread_idx < rows) {
        SM80_CP_ASYNC_CACHEALWAYS<float>::copy(lse_row[m_block * kBlockM + thread_idx], stats[0]);
        SM80_CP_ASYNC_CACHEALWAYS<float>::copy(delta_row[m_block * kBlockM + thread_idx], stats[kBlockM]);
      } else {
        stats[0] = -INFINITY;
        stats[kBlockM] = 0.f;
      }
      if (ranges.enabled()) {
        int4* range = smem_row_ranges + stage * kBlockM + thread_idx;
        if (thread_idx < rows) {
          SM80_CP_ASYNC_CACHEALWAYS<int4>::copy(ranges.rows()[m_block * kBlockM + thread_idx], *range);
        } else {
          *range = make_int4(0, 0, 1, 0);
        }
      }
    }
  };
  if (m_begin < m_end) load_query_tile(m_begin, 0);
  cp_async_fence();

  // ---- Main loop over the query tiles that see this key tile ----
  for (int m_block = m_begin; m_block < m_end; ++m_block) {
    const int stage = kDoubleBufferQ ? (m_block - m_begin) & 1 : 0;
    Tensor sQ = q_stage(smem_q, stage);
    Tensor sQt = q_stage_t(smem_q, stage);
    Tensor sdO = q_stage(smem_do, stage);
    Tensor sdOt = q_stage_t(smem_do, stage);
    cp_async_wait<0>();
    __syncthreads();  // this query tile landed; every warp is done with the previous one
    if constexpr (kDoubleBufferQ) {
      if (m_block + 1 < m_end) load_query_tile(m_block + 1, stage ^ 1);
      cp_async_fence();
    }

    // A query tile the mask hides from these keys entirely adds nothing (deterministic mode, whose
    // dQ turns count every query tile, computes its zeros).
    if (p.mask.bits != nullptr && params.dq_semaphore == nullptr &&
        !mask_tile_visible<kBlockM, kBlockN, Traits::kNThreads>(p, batch, head, m_block * kBlockM,
                                                                n_block * kBlockN)) {
      if constexpr (!kDoubleBufferQ) {
        if (m_block + 1 < m_end) load_query_tile(m_block + 1, 0);
        cp_async_fence();
      }
      continue;
    }

    // lse·log2(e) and delta of this thread's rows. Rows that see no key (lse = -inf) and rows
    // past seqlen_q get +inf, so that P is exactly 0.
    constexpr int kRows = decltype(size<0>(coords_s))::value;
    float row_lse_log2[kRows], row_delta[kRows];
    const float* stats = smem_stats + stage * 2 * kBlockM;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = get<0>(coords_s(r, 0));
      const float lse = stats[row];
      row_lse_log2[r] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
      row_delta[r] = stats[kBlockM + row];
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});   // (MMA, MMA_M, MMA_N)
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    if (p.bias.data != nullptr) {  // q·kᵀ accumulates onto the bias, as in the forward
      Tensor bias_scores = acc_rowcol(acc_s);
      fill_with_bias(bias_scores, coords_s, p, batch, head, m_block * kBlockM, n_block * kBlockN);
    } else {
      clear(acc_s);
    }
    clear(acc_dp);
    gemm_smem_smem(acc_s, tSrQ, tSrK, ldsm_a_sdp.get_thread_slice(thread_idx).partition_S(sQ), tSsK, mma_sdp,
                   ldsm_a_sdp, ldsm_b_sdp, thread_idx);
    Tensor scores = acc_rowcol(acc_s);
    if (mask.needs_masking(m_block, n_block)) mask.apply(scores, coords_s, m_block, n_block);
    if (ranges.enabled()) {
      const int4* row_ranges = smem_row_ranges + stage * kBlockM;
      auto range_of = [&](int r) { return row_ranges[r]; };
      if (ranges.needs_masking(ranges.query_tile(range_of), n_block)) ranges.apply(scores, coords_s, n_block, range_of);
    }
    gemm_smem_smem(acc_dp, tdPrdO, tdPrV, ldsm_a_sdp.get_thread_slice(thread_idx).partition_S(sdO), tdPsV, mma_sdp,
                   ldsm_a_sdp, ldsm_b_sdp, thread_idx);

    // P = exp(scale·s − lse); dS = P ∘ (dP − delta), the gradient of the logits scale·s, which
    // dq and dk then scale by softmax_scale. With soft-capping (see softcap_scores) the logits
    // are softcap·t: P = exp(softcap·t − lse), and dS also carries the cap's derivative 1 − t².
    // ALiBi adds −slope·distance to the logits (alibi.h), whose slope gradient is Σ dS·(−distance)
    // with dS before the cap's factor. Both come here, after the masks (in the forward, before
    // them), a masked -inf kept as it is: t = tanh(scale·s / softcap) formed next to its use holds
    // no registers across the dP product (capping the whole tile before the masks made ptxas
    // spill 20 more bytes). The plain form has neither, so that they cost the plain path nothing.
    Tensor dp = acc_rowcol(acc_dp);
    auto form_p_ds = [&](auto score_mods) {
      const bool capped = p.softcap > 0.f;
      const float alibi_slope = decltype(score_mods)::value ? alibi_register_slope(p, batch, head) : 0.f;
      float dalibi = 0.f;  // this thread's Σ dS·(−distance)
      const auto distances = alibi_distances(coords_s, m_block * kBlockM - n_block * kBlockN + p.seqlen_k - p.seqlen_q);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const float row_offset = decltype(score_mods)::value ? distances.row_offset(r) : 0.f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(scores); ++c) {
          float s = scores(r, c);
          float distance = 0.f;
          if constexpr (decltype(score_mods)::value) {
            if (capped && s != -INFINITY) s = tanh_from_2y_log2e(s * p.softcap_exp2_scale);
            distance = distances.distance(row_offset, c);
          }
          const float x = decltype(score_mods)::value ? s - alibi_slope * distance : s;
          scores(r, c) = exp2f(x * scale_log2 - row_lse_log2[r]);
          dp(r, c) = scores(r, c) * (dp(r, c) - row_delta[r]);
          if constexpr (decltype(score_mods)::value) {
            dalibi -= dp(r, c) * distance;
            // A masked t is -inf: the clamp makes its factor 0, not -inf (P = 0 there; 0·-inf = NaN).
            if (capped) dp(r, c) *= fmaxf(1.f - s * s, 0.f);
          }
        }
      }
      if (decltype(score_mods)::value && p.alibi_slopes != nullptr) dalibi_sums.add(dalibi);
    };
    if (p.softcap > 0.f || p.alibi_slopes != nullptr || p.dropout.seed != nullptr || p.mask.bits != nullptr ||
        p.bias.data != nullptr) {
      // The mask here, not next to the band's: in the plain form its code made ptxas spill.
      if (p.mask.bits != nullptr) {
        apply_mask_bits<kBlockN>(scores, coords_s, p, batch, head, m_block * kBlockM, n_block * kBlockN);
      }
      // Dropout: dP, the gradient of the kept probabilities scaled by keep_scale, becomes that of
      // P, so dS = P ∘ (dP − delta); P goes on to dV dropped (and unscaled).
      const bool dropout = p.dropout.seed != nullptr;
      uint64_t keep = 0;
      if (dropout) {
        keep = keep_bits<Traits::kSdPKeyStride>(tScS, DropoutTile(p, batch, head, m_block * kBlockM, n_block * kBlockN));
        apply_keep_bits(acc_dp, keep, p.dropout.keep_scale);
      }
      form_p_ds(true_type{});
      if (dropout) apply_keep_bits(acc_s, keep, 1.f);
    } else {
      form_p_ds(false_type{});
    }
    copy(store_pds, thr_store_pds.retile_S(convert_fragment<Element>(acc_s)), tPsP);
    copy(store_pds, thr_store_pds.retile_S(convert_fragment<Element>(acc_dp)), tdSsdS);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (Traits::kBulkDq) bulk_wait_read();  // a no-op but in the issuing thread
#endif
    __syncthreads();  // P and dS visible to every warp (and the dQ staging tile free)
    if (params.dbias != nullptr) {
      add_bias_grad<kBlockM, kBlockN, Traits::kNThreads>(sdS, params, batch, head, m_block * kBlockM, n_block * kBlockN);
    }

    // dQ = dS·K, added into dq_accum. Deterministic mode: key tiles add into this query tile one
    // at a time, in key-tile order; key tile n waits only for key tiles < n of the same
    // (batch, head), which the hardware scheduled before it (the grid walks x = n_block first).
    auto add_dq = [&] {
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
      clear(acc_dq);
      gemm_smem_smem(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, ldsm_a_dq, ldsm_bt_dq, thread_idx);
      int* semaphore = nullptr;
      if (params.dq_semaphore != nullptr) {
        const int counters = (p.seqlen_q + kDqSemaphoreRowsPerCounter - 1) / kDqSemaphoreRowsPerCounter;
        semaphore = params.dq_semaphore + (int64_t(batch) * p.num_heads + head) * counters + m_block;
      }
      // The band's key tiles of this query tile start at n_block_begin.
      const int turn = n_block - mask.n_block_begin(m_block);
      auto wait_turn = [&] {
        while (*reinterpret_cast<volatile int*>(semaphore) != turn) {
        }
      };
      float* dq_tile = dq_accum + int64_t(m_block) * kBlockM * kHeadDim;
      if constexpr (Traits::kBulkDq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // The staging tile is free: the previous tile's reduction finished reading it before the
        // barrier that published P and dS.
        dq_staging.store(acc_dq, thread_idx);
        fence_smem_for_async_proxy();
        __syncthreads();
        if (thread_idx == 0) {
          if (semaphore != nullptr) wait_turn();
          dq_staging.reduce(dq_tile);
          if (semaphore != nullptr) {
            bulk_wait_done();
            __threadfence();
            atomicAdd(semaphore, 1);
          }
        }
#endif
      } else {
        if (semaphore != nullptr) {
          if (thread_idx == 0) wait_turn();
          __syncthreads();
        }
        add_dq_atomic<kBlockM, kHeadDim, Traits::kNThreads>(dq_tile, acc_dq, thread_idx);
        if (semaphore != nullptr) {
          __threadfence();
          __syncthreads();
          if (thread_idx == 0) atomicAdd(semaphore, 1);
        }
      }
    };

    // With Q double-buffered, dQ goes first so that its atomics drain while the tensor cores
    // compute dV and dK; otherwise last, so that the next Q and dO load while it runs.
    if constexpr (kDoubleBufferQ) add_dq();
    gemm_smem_smem(acc_dv, tdVrPt, tdVrdOt, tdVsPt, ldsm_bt_dkv.get_thread_slice(thread_idx).partition_S(sdOt),
                   mma_dkv, ldsm_at_dkv, ldsm_bt_dkv, thread_idx);
    gemm_smem_smem(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, ldsm_bt_dkv.get_thread_slice(thread_idx).partition_S(sQt),
                   mma_dkv, ldsm_at_dkv, ldsm_bt_dkv, thread_idx);
    if constexpr (!kDoubleBufferQ) {
      __syncthreads();  // every warp is done with Q and dO
      if (m_block + 1 < m_end) load_query_tile(m_block + 1, 0);
      cp_async_fence();
      add_dq();
    }
  }

  // ---- Epilogue: dK = scale · Σ dSᵀQ and dV = keep_scale · Σ PᵀdO; rows past seqlen_k are not
  // written ----
  Tensor tdKVcdKV = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  const int64_t dkv_offset = batch * params.dkv_batch_stride + head * params.dkv_head_stride +
                             int64_t(n_block) * kBlockN * params.dkv_row_stride;
  Element* dk = static_cast<Element*>(params.dk) + dkv_offset;
  Element* dv = static_cast<Element*>(params.dv) + dkv_offset;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) {
    const int key = get<0>(tdKVcdKV(i));
    if (key < keys_in_tile) {
      const int64_t offset = key * params.dkv_row_stride + get<1>(tdKVcdKV(i));
      dk[offset] = Element(acc_dk(i) * p.softmax_scale);
      dv[offset] = Element(acc_dv(i) * p.dropout.keep_scale);  // 1 without dropout
    }
  }
  if (p.alibi_slopes != nullptr) {
    dalibi_sums.write_total(params.dalibi_partial + (int64_t(batch) * p.num_heads + head) * alibi_partials(p.seqlen_k) +
                            n_block);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (Traits::kBulkDq) bulk_wait_done();  // shared memory must outlive the reduction
#endif
}

// Each variant is compiled only for the architectures it runs on (the launcher picks the one
// whose binary matches the device): the bulk-dQ variant for SM90, the atomic one below it.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) flash_bwd_kernel(const __grid_constant__ FlashBwdParams params) {
#if defined(__CUDA_ARCH__)
  if constexpr (Traits::kBulkDq == (__CUDA_ARCH__ >= 900)) flash_bwd_key_tile<Traits>(params);
#endif
}

}  // namespace jax_flash
