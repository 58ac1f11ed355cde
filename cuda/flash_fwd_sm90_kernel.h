// Forward kernel of the Hopper family (sm_90a), warp-specialized. One CTA computes 64 query rows
// per consumer warpgroup of one (batch, head). The first warpgroup (the producer) has one thread
// issue TMA loads of Q and of K and V tiles into rings of kStages slots, each slot guarded by an
// mbarrier pair (full: the bytes landed; empty: every consumer is done with it). Each consumer:
// S = QKᵀ as wgmma with both operands in shared memory, the online softmax in registers, O += PV
// as wgmma with P from registers; it issues tile i's S and runs its softmax while the tensor cores
// still add tile i-1's P·V; O leaves through shared memory by one TMA store. The producer gives its
// registers to the consumers (setmaxnreg). Plain attention, causal and windowed bands, GQA; the
// score modifiers and packed sequences stay on the SM80 family.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "attention_mask.h"
#include "flash_params.h"
#include "fwd_sm90_traits.h"
#include "online_softmax.h"
#include "register_layouts.h"
#include "sm90_wgmma.h"

namespace jax_flash {

using namespace cute;

// The kernel's arguments: the parameters and the TMA descriptors the host built from them.
template <typename Traits>
struct Sm90FwdArgs {
  FlashFwdParams params;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::TmaO tma_o;
};

// kHeadsFastest: the grid is (heads, query tiles, batch) rather than (query tiles, heads, batch),
// so the hardware, starting CTAs in index order, starts every head's heaviest causal tile before any
// head's lighter ones (the launch picks it; see flash_fwd_sm90_launch_template.h).
template <typename Traits, bool kHeadsFastest>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ Sm90FwdArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  using QBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  const FlashFwdParams& params = args.params;

  extern __shared__ __align__(1024) char smem_sm90[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(smem_sm90);

  const bool producer = threadIdx.x < 128;
  // Reverse order: under causal masking the last query tiles have the most keys; start them first.
  const int m_block = kHeadsFastest ? gridDim.y - 1 - blockIdx.y : gridDim.x - 1 - blockIdx.x;
  const int head = kHeadsFastest ? blockIdx.x : blockIdx.y;
  const int batch = blockIdx.z;
  const AttentionMask<kBlockM, kBlockN> mask{params};
  const int n_block_begin = mask.n_block_begin(m_block);
  const int n_block_end = mask.n_block_end(m_block);
  const int num_tiles = max(n_block_end - n_block_begin, 0);  // counted from the last visible one down
  auto n_block_of = [&](int i) { return n_block_end - 1 - i; };

  // ---- Barriers: Q's, and the K and V rings' ----
  if (threadIdx.x == 0) {
    QBarrier::init(&shared.q_barrier, 1);
    cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kKVTileBytes;
  pipeline_params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = 128 * Traits::kMmaWarpGroups;
  Pipeline pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();  // every barrier initialized before anyone waits on or arrives at one

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});   // (kBlockM, kHeadDim)
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim, slot)
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim, slot)
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});  // (kHeadDim, kBlockN, slot)

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x != 0 || num_tiles == 0) return;
    const int head_k = head / (params.num_heads / params.num_heads_k);
    auto matrix = [&](auto const& tma, int seqlen, int heads) {  // (seqlen, kHeadDim, heads, batch) coordinates
      return tma.get_tma_tensor(make_shape(seqlen, Int<kHeadDim>{}, heads, params.batch));
    };
    Tensor gQ = local_tile(matrix(args.tma_q, params.seqlen_q, params.num_heads)(_, _, head, batch),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (kBlockM, kHeadDim)
    Tensor gK = local_tile(matrix(args.tma_k, params.seqlen_k, params.num_heads_k)(_, _, head_k, batch),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (kBlockN, kHeadDim, n)
    Tensor gV = local_tile(matrix(args.tma_v, params.seqlen_k, params.num_heads_k)(_, _, head_k, batch),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (kBlockN, kHeadDim, n)
    auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

    // Rows past the sequence ends arrive as zeros (TMA fills out-of-bounds boxes).
    QBarrier::arrive_and_expect_tx(&shared.q_barrier, Traits::kQBytes);
    copy(args.tma_q.with(shared.q_barrier), tQgQ, tQsQ);
    PipelineState k_state = cutlass::make_producer_start_state<Pipeline>();
    PipelineState v_state = cutlass::make_producer_start_state<Pipeline>();
    for (int i = 0; i < num_tiles; ++i) {
      pipeline_k.producer_acquire(k_state);
      copy(args.tma_k.with(*pipeline_k.producer_get_barrier(k_state)), tKgK(_, n_block_of(i)), tKsK(_, k_state.index()));
      ++k_state;
      pipeline_v.producer_acquire(v_state);
      copy(args.tma_v.with(*pipeline_v.producer_get_barrier(v_state)), tVgV(_, n_block_of(i)), tVsV(_, v_state.index()));
      ++v_state;
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int thread_idx = threadIdx.x - 128;
  const int rows_in_tile = min(kBlockM, params.seqlen_q - m_block * kBlockM);
  float* lse_row = params.lse + (int64_t(batch) * params.num_heads + head) * params.seqlen_q;

  typename Traits::TiledMmaS tiled_mma_s;
  typename Traits::TiledMmaO tiled_mma_o;
  auto thr_mma_s = tiled_mma_s.get_thread_slice(thread_idx);
  auto thr_mma_o = tiled_mma_o.get_thread_slice(thread_idx);
  Tensor tSrQ = thr_mma_s.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma_s.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, slot)
  Tensor tOrVt = thr_mma_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, slot)
  Tensor acc_o = partition_fragment_C(tiled_mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc_o);

  // (row, col) of every score this thread holds, for masking and for the lse rows.
  Tensor tScS = thr_mma_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor score_coords = make_tensor(tScS.data(), wgmma_acc_rowcol_layout(tScS.layout()));  // (rows, cols)
  Tensor acc_o_rc = wgmma_acc_rowcol(acc_o);  // (rows, kHeadDim cols)
  OnlineSoftmax<decltype(size<0>(acc_o_rc))::value> softmax;
  const float scale_log2 = params.logit_scale * float(M_LOG2E);

  // P of the previous tile, waiting for its P·V MMA (the A operand of the next one).
  Tensor tOrP = make_tensor<Element>(wgmma_acc_to_a_layout(
      partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout()));  // (MMA, MMA_M, MMA_K)
  PipelineState k_state, v_state;  // slot 0, phase 0
  auto step = [&](int i, auto needs_mask, auto has_previous) {
    Tensor acc_s = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    pipeline_k.consumer_wait(k_state);
    wgmma_gemm</*kZeroInit=*/true>(tiled_mma_s, tSrQ, tSrK(_, _, _, k_state.index()), acc_s);
    if constexpr (decltype(has_previous)::value) {
      pipeline_v.consumer_wait(v_state);
      wgmma_gemm</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrVt(_, _, _, v_state.index()), acc_o);
      warpgroup_wait<1>();  // S_i done; P·V of tile i-1 may still run
    } else {
      warpgroup_wait<0>();
    }
    pipeline_k.consumer_release(k_state);
    ++k_state;
    Tensor scores = wgmma_acc_rowcol(acc_s);  // (rows, kBlockN cols)
    if constexpr (decltype(needs_mask)::value) mask.apply(scores, score_coords, m_block, n_block_of(i));
    float correction[decltype(size<0>(acc_o_rc))::value];
    const bool max_moved = softmax.update_scores(scores, scale_log2, correction);
    if constexpr (decltype(has_previous)::value) {
      warpgroup_wait<0>();
      pipeline_v.consumer_release(v_state);
      ++v_state;
    }
    softmax.rescale(acc_o_rc, correction, max_moved);
    convert_fragment_into(acc_s, tOrP);
  };
  if (num_tiles > 0) QBarrier::wait(&shared.q_barrier, 0);
  for (int i = 0; i < num_tiles; ++i) {
    if (i == 0) {
      step(i, true_type{}, false_type{});
    } else if (mask.needs_masking(m_block, n_block_of(i))) {
      step(i, true_type{}, true_type{});
    } else {
      step(i, false_type{}, true_type{});
    }
  }
  if (num_tiles > 0) {  // the last tile's P·V
    pipeline_v.consumer_wait(v_state);
    wgmma_gemm</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrVt(_, _, _, v_state.index()), acc_o);
    warpgroup_wait<0>();
  }

  // ---- Epilogue: normalize; the lse rows straight from registers, O through shared memory ----
  Tensor lse = softmax.finalize(acc_o_rc, params.logit_scale);
  if (get<1>(score_coords(0, 0)) == 0) {  // one thread of each quad writes its rows' lse
    CUTE_UNROLL
    for (int r = 0; r < size(lse); ++r) {
      const int row = get<0>(score_coords(r, 0));
      if (row < rows_in_tile) lse_row[m_block * kBlockM + row] = lse(r);
    }
  }
  // Q's buffer takes O: each warpgroup's S MMAs read only its own 64 rows of Q, all finished by now,
  // and it overwrites only those rows.
  Tensor rO = convert_fragment<Element>(acc_o);
  typename Traits::SmemCopyO smem_copy_o;
  auto thr_copy_o = smem_copy_o.get_thread_slice(thread_idx);
  copy(smem_copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sQ));
  cutlass::arch::fence_view_async_shared();  // make the stores visible to the TMA unit
  cutlass::arch::NamedBarrier::sync(128 * Traits::kMmaWarpGroups, /*barrier_id=*/0);
  if (thread_idx == 0) {
    Tensor mO = args.tma_o.get_tma_tensor(make_shape(params.seqlen_q, Int<kHeadDim>{}, params.num_heads, params.batch));
    Tensor gO = local_tile(mO(_, _, head, batch), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
    auto [tOgO, tOsO] = tma_partition(args.tma_o, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gO));
    copy(args.tma_o, tOsO, tOgO);
    tma_store_arrive();
    tma_store_wait<0>();  // the CTA's shared memory must outlive the store's reads of it
  }
#endif
}

}  // namespace jax_flash
