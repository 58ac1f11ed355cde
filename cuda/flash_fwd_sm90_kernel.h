// Forward kernel of the Hopper family (sm_90a). One CTA of two warpgroups computes 128 query rows
// of one (batch, head): each warpgroup owns 64 rows, S = QKᵀ runs as wgmma with both operands in
// shared memory, the online softmax in registers, O += PV as wgmma with P from registers. K and V
// stream through rings of kStages slots: the next tiles' cp.async runs under the current tile's math.
// Plain attention, causal and windowed bands, GQA; the score modifiers and packed sequences stay
// on the SM80 family.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "attention_mask.h"
#include "flash_params.h"
#include "fwd_head_tiles.h"
#include "online_softmax.h"
#include "register_layouts.h"
#include "sm90_wgmma.h"
#include "tile_copy.h"

namespace jax_flash {

using namespace cute;

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FlashFwdParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_sm90[];  // the 128-byte swizzle repeats every 1024 bytes

  const int thread_idx = threadIdx.x;
  // Reverse order: under causal masking the last query tiles have the most keys; start them first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;

  const AttentionMask<kBlockM, kBlockN> mask{params};
  const int n_block_begin = mask.n_block_begin(m_block);
  const int n_block_end = mask.n_block_end(m_block);
  const int rows_in_tile = min(kBlockM, params.seqlen_q - m_block * kBlockM);

  // ---- Global tiles of this (batch, head) ----
  // (kBlockM, kHeadDim), (kBlockN, kHeadDim, n) twice, (kBlockM, kHeadDim)
  auto [gQ, gK, gV, gO] = fwd_head_tiles<Element, kBlockM, kBlockN, kHeadDim>(params, batch, head, m_block);
  float* lse_row = lse_row_of(params, batch, head);
  Tensor cQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});   // (kBlockM, kHeadDim) -> (row, col)
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (kBlockN, kHeadDim) -> (row, col)

  // ---- Shared memory: Q, then the K and V rings ----
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_sm90)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim, stage)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim, stage)
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});            // (kHeadDim, kBlockN, stage)

  typename Traits::GmemTiledCopyAsync gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(thread_idx);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_M, CPY_K)
  Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
  Tensor tQcQ = gmem_thr_copy.partition_S(cQ);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = gmem_thr_copy.partition_D(sK);  // (CPY, CPY_N, CPY_K, stage)
  Tensor tVgV = gmem_thr_copy.partition_S(gV);
  Tensor tVsV = gmem_thr_copy.partition_D(sV);
  Tensor tKVcKV = gmem_thr_copy.partition_S(cKV);
  auto load_k = [&](int n_block, int stage) {
    Tensor tKsK_stage = tKsK(_, _, _, stage);
    copy_rows</*kZeroFill=*/true>(gmem_copy, tKgK(_, _, _, n_block), tKsK_stage, tKVcKV,
                                  params.seqlen_k - n_block * kBlockN);
  };
  auto load_v = [&](int n_block, int stage) {
    Tensor tVsV_stage = tVsV(_, _, _, stage);
    copy_rows</*kZeroFill=*/true>(gmem_copy, tVgV(_, _, _, n_block), tVsV_stage, tKVcKV,
                                  params.seqlen_k - n_block * kBlockN);
  };

  // ---- MMA fragments: shared-memory descriptors for Q, K and V, registers for S, P and O ----
  typename Traits::TiledMmaS tiled_mma_s;
  typename Traits::TiledMmaO tiled_mma_o;
  auto thr_mma_s = tiled_mma_s.get_thread_slice(thread_idx);
  auto thr_mma_o = tiled_mma_o.get_thread_slice(thread_idx);
  Tensor tSrQ = thr_mma_s.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma_s.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrVt = thr_mma_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor acc_o = partition_fragment_C(tiled_mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc_o);

  // (row, col) of every score this thread holds, for masking and for the lse rows.
  Tensor tScS = thr_mma_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor score_coords = make_tensor(tScS.data(), wgmma_acc_rowcol_layout(tScS.layout()));  // (rows, cols)
  Tensor acc_o_rc = wgmma_acc_rowcol(acc_o);  // (rows, kHeadDim cols)
  OnlineSoftmax<decltype(size<0>(acc_o_rc))::value> softmax;
  const float scale_log2 = params.logit_scale * float(M_LOG2E);

  // ---- Pipeline. Tile i's S = QKᵀ and softmax run while the tensor cores still add tile i-1's
  // P·V (issued just after S_i, waited for after the softmax), so a warpgroup's exp2 work hides
  // under its own MMAs. K and V each cycle through kStages slots; step i waits for the loads
  // issued kStages-1 steps earlier (K_i and V_{i-1}), then, behind the barrier that also
  // certifies every warpgroup done with K_{i-1} and V_{i-2}, loads K_{i+kStages-1} and
  // V_{i+kStages-2} into their slots. Tiles are counted from the last visible one down. ----
  constexpr int kStages = Traits::kStages;
  const int num_tiles = n_block_end - n_block_begin;
  auto n_block_of = [&](int i) { return n_block_end - 1 - i; };
  auto load_tiles = [&](int k_tile, int v_tile) {  // one commit group, empty past the last tile
    if (k_tile < num_tiles) load_k(n_block_of(k_tile), k_tile % kStages);
    if (v_tile >= 0 && v_tile < num_tiles) load_v(n_block_of(v_tile), v_tile % kStages);
    cp_async_fence();
  };
  copy_rows</*kZeroFill=*/true>(gmem_copy, tQgQ, tQsQ, tQcQ, rows_in_tile);
  for (int s = 0; s < kStages - 1; ++s) load_tiles(s, s - 1);

  // P of the previous tile, waiting for its P·V MMA (the A operand of the next one).
  Tensor tOrP = make_tensor<Element>(wgmma_acc_to_a_layout(
      partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout()));  // (MMA, MMA_M, MMA_K)
  auto step = [&](int i, int slot, int previous_slot, auto needs_mask, auto has_previous) {
    cp_async_wait<kStages - 2>();
    fence_smem_for_async_proxy();
    __syncthreads();
    load_tiles(i + kStages - 1, i + kStages - 2);

    Tensor acc_s = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    wgmma_gemm</*kZeroInit=*/true>(tiled_mma_s, tSrQ, tSrK(_, _, _, slot), acc_s);
    if constexpr (decltype(has_previous)::value) {
      wgmma_gemm</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrVt(_, _, _, previous_slot), acc_o);
      warpgroup_wait<1>();  // S_i done; P·V of tile i-1 may still run
    } else {
      warpgroup_wait<0>();
    }
    Tensor scores = wgmma_acc_rowcol(acc_s);  // (rows, kBlockN cols)
    if constexpr (decltype(needs_mask)::value) mask.apply(scores, score_coords, m_block, n_block_of(i));
    float correction[decltype(size<0>(acc_o_rc))::value];
    const bool max_moved = softmax.update_scores(scores, scale_log2, correction);
    if constexpr (decltype(has_previous)::value) warpgroup_wait<0>();
    softmax.rescale(acc_o_rc, correction, max_moved);
    convert_fragment_into(acc_s, tOrP);
  };
  int slot = 0, previous_slot = kStages - 1;
  for (int i = 0; i < num_tiles; ++i) {
    if (i == 0) {
      step(i, slot, previous_slot, true_type{}, false_type{});
    } else if (mask.needs_masking(m_block, n_block_of(i))) {
      step(i, slot, previous_slot, true_type{}, true_type{});
    } else {
      step(i, slot, previous_slot, false_type{}, true_type{});
    }
    previous_slot = slot;
    slot = slot == kStages - 1 ? 0 : slot + 1;
  }
  if (num_tiles > 0) {  // the last tile's P·V
    cp_async_wait<0>();
    fence_smem_for_async_proxy();
    __syncthreads();
    wgmma_gemm</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrVt(_, _, _, previous_slot), acc_o);
    warpgroup_wait<0>();
  }

  // ---- Epilogue: normalize, write O and the lse rows straight from registers ----
  Tensor lse = softmax.finalize(acc_o_rc, params.logit_scale);
  if (get<1>(score_coords(0, 0)) == 0) {  // one thread of each quad writes its rows' lse
    CUTE_UNROLL
    for (int r = 0; r < size(lse); ++r) {
      const int row = get<0>(score_coords(r, 0));
      if (row < rows_in_tile) lse_row[m_block * kBlockM + row] = lse(r);
    }
  }
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor tOgO = thr_mma_o.partition_C(gO);  // (MMA, MMA_M, MMA_N)
  Tensor tOcO = thr_mma_o.partition_C(cQ);
  CUTE_UNROLL
  for (int i = 0; i < size(rO); ++i) {
    if (get<0>(tOcO(i)) < rows_in_tile) tOgO(i) = rO(i);
  }
#endif
}

}  // namespace jax_flash
