// Backward kernel of the Hopper family (sm_90a), warp-specialized. One CTA owns kBlockN keys of one
// (batch, head) and walks the query tiles that see them. The first warpgroup (the producer) loads
// K and V once and each query tile's Q and dO by TMA into a ring of kStages slots (one thread), and
// the tile's lse·log2(e) and delta rows into a ring beside it (one warp). The two consumer
// warpgroups hold dK and dV in registers and, per query tile:
//   Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (wgmma, both operands in shared memory),
//   Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ∘ (dPᵀ − delta) in registers,
//   dV += Pᵀ·dO and dK += dSᵀ·Q (wgmma),
//   dS to shared memory; dQ = dS·K, each warpgroup a block of it, staged in shared memory.
// A third producer warp adds the staged dQ to dq_accum (rows of float32, zeroed by the caller) by
// TMA bulk reductions; in deterministic mode it takes its turn on dq_semaphore first, off the
// consumers' path. With 128 keys per CTA each consumer owns 64 keys (Pᵀ, dSᵀ stay in registers
// for dV, dK); at head dim 256 (kSplitHeadDim, 64 keys) each owns half the head dim of dK and dV
// and forms Sᵀ for half the queries, Pᵀ and dSᵀ meeting in shared memory. Plain attention, causal
// and windowed bands, GQA (dK, dV per query head); the score modifiers and packed sequences stay
// on the SM80 family.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "attention_mask.h"
#include "bwd_sm90_traits.h"
#include "flash_params.h"
#include "register_layouts.h"
#include "sm90_bulk_async.h"
#include "sm90_tile_order.h"
#include "sm90_wgmma.h"

namespace jax_flash {

using namespace cute;

// The kernel's arguments: the parameters, the order of the CTAs and the TMA descriptors the host
// built from them.
template <typename Traits>
struct Sm90BwdArgs {
  FlashBwdParams params;
  Sm90TileOrder tile_order;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaQ tma_do;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::TmaDkv tma_dk;
  typename Traits::TmaDkv tma_dv;
};

// Named barriers (id 0 is __syncthreads'): kDqReady and kDqFree between the two consumer
// warpgroups and the dQ writer warp, the others among the consumers.
enum class Sm90BwdBarrier : int { kDsStored = 1, kMmasDone = 2, kDqReady = 3, kDqFree = 4, kDkvStaged = 5 };

__forceinline__ __device__ void named_sync(Sm90BwdBarrier id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}

__forceinline__ __device__ void named_arrive(Sm90BwdBarrier id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ Sm90BwdArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  using PipelineQdO = typename Traits::PipelineQdO;
  using PipelineStats = typename Traits::PipelineStats;
  using PipelineState = cutlass::PipelineState<Traits::kStages>;
  using KVBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kConsumerThreads = 128 * Traits::kMmaWarpGroups;
  constexpr int kDqSyncThreads = kConsumerThreads + 32;  // and the dQ writer warp
  constexpr bool kSplitHeadDim = Traits::kSplitHeadDim;
  const FlashBwdParams& params = args.params;
  const FlashFwdParams& p = params.fwd;

  extern __shared__ __align__(1024) char smem_sm90_bwd[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(smem_sm90_bwd);

  const int warp_group = threadIdx.x / 128;
  // Heaviest key tiles first: the first ones under a right bound (causal), the last ones under a
  // left bound alone, except in deterministic mode: there a key tile waits for the ones before it
  // to add their dQ, so those must be dispatched first or the waiters could fill every SM.
  const Sm90Tile tile = args.tile_order.at(blockIdx.x);
  const bool descending = p.window_left >= 0 && p.window_right < 0 && params.dq_semaphore == nullptr;
  const int n_block = descending ? args.tile_order.tiles_per_pair - 1 - tile.rank : tile.rank;
  const int head = tile.head;
  const int batch = tile.batch;
  const AttentionMask<kBlockM, kBlockN> mask{p};
  const int m_begin = mask.m_block_begin(n_block);
  const int m_end = mask.m_block_end(n_block);

  // ---- Barriers: K and V's, the Q/dO ring's and the statistics ring's ----
  if (threadIdx.x == 0) {
    KVBarrier::init(&shared.kv_barrier, 1);
    cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_do.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
  }
  typename PipelineQdO::Params qdo_params;
  qdo_params.transaction_bytes = 2 * Traits::kQBytes;
  qdo_params.role = warp_group == 0 ? PipelineQdO::ThreadCategory::Producer : PipelineQdO::ThreadCategory::Consumer;
  qdo_params.is_leader = threadIdx.x == 0;
  qdo_params.num_consumers = kConsumerThreads;
  PipelineQdO pipeline_qdo(shared.pipeline_qdo, qdo_params, Shape<_1, _1, _1>{});
  const bool stats_warp = threadIdx.x / 32 == 1;
  const bool dq_writer_warp = threadIdx.x / 32 == 2;
  typename PipelineStats::Params stats_params;
  stats_params.role = stats_warp         ? PipelineStats::ThreadCategory::Producer
                      : warp_group == 0 ? PipelineStats::ThreadCategory::NonParticipant
                                        : PipelineStats::ThreadCategory::Consumer;
  stats_params.producer_arv_count = Traits::kStatsThreads;
  stats_params.consumer_arv_count = kConsumerThreads;
  PipelineStats pipeline_stats(shared.pipeline_stats, stats_params);
  __syncthreads();  // every barrier initialized before anyone waits on or arrives at one

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});      // (kBlockM, d, slot)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});  // (kBlockM, d, slot)
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKV{});     // (kBlockN, d)
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKV{});     // (kBlockN, d)
  // dQ's rows of floats, staged for the bulk reductions.
  auto dq_row = [&](int slot, int row) -> float* {
    if constexpr (kSplitHeadDim) {  // the first half of the rows in Q's slot, the rest in dO's
      static_assert(2 * Traits::kQBytes == kBlockM * kHeadDim * sizeof(float), "Q's and dO's slots hold dQ");
      constexpr int kHalf = kBlockM / 2;
      Element* base = row < kHalf ? shared.q.data() : shared.dout.data();
      return reinterpret_cast<float*>(base + slot * cosize_v<typename Traits::SmemLayoutQTile>) +
             (row % kHalf) * kHeadDim;
    } else {
      return shared.p_or_dq.dq + row * kHeadDim;
    }
  };

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (m_begin >= m_end) return;
    if (threadIdx.x == 0) {
      const int head_k = head / (p.num_heads / p.num_heads_k);
      auto matrix = [&](auto const& tma, int seqlen, int heads) {  // (seqlen, d, heads, batch) coordinates
        return tma.get_tma_tensor(make_shape(seqlen, Int<kHeadDim>{}, heads, p.batch));
      };
      Tensor gQ = local_tile(matrix(args.tma_q, p.seqlen_q, p.num_heads)(_, _, head, batch),
                             Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));  // (kBlockM, d, m)
      Tensor gdO = local_tile(matrix(args.tma_do, p.seqlen_q, p.num_heads)(_, _, head, batch),
                              Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));  // (kBlockM, d, m)
      Tensor gK = local_tile(matrix(args.tma_k, p.seqlen_k, p.num_heads_k)(_, _, head_k, batch),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));  // (kBlockN, d)
      Tensor gV = local_tile(matrix(args.tma_v, p.seqlen_k, p.num_heads_k)(_, _, head_k, batch),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));  // (kBlockN, d)
      auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tdOgdO, tdOsdO] =
          tma_partition(args.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      KVBarrier::arrive_and_expect_tx(&shared.kv_barrier, 2 * Traits::kKVBytes);
      copy(args.tma_k.with(shared.kv_barrier), tKgK, tKsK);
      copy(args.tma_v.with(shared.kv_barrier), tVgV, tVsV);
      PipelineState state = cutlass::make_producer_start_state<PipelineQdO>();
      for (int m_block = m_begin; m_block < m_end; ++m_block) {
        pipeline_qdo.producer_acquire(state);
        auto* full = pipeline_qdo.producer_get_barrier(state);
        copy(args.tma_q.with(*full), tQgQ(_, m_block), tQsQ(_, state.index()));
        copy(args.tma_do.with(*full), tdOgdO(_, m_block), tdOsdO(_, state.index()));
        ++state;
      }
    } else if (stats_warp) {
      // lse·log2(e) and delta of each query row; rows past seqlen_q and rows that see no key
      // (lse = -inf) get +inf, so that their P is exactly 0.
      const int lane = threadIdx.x % 32;
      const int64_t stats_offset = (int64_t(batch) * p.num_heads + head) * p.seqlen_q;
      PipelineState state = cutlass::make_producer_start_state<PipelineStats>();
      for (int m_block = m_begin; m_block < m_end; ++m_block) {
        pipeline_stats.producer_acquire(state);
        for (int i = lane; i < kBlockM; i += Traits::kStatsThreads) {
          const int row = m_block * kBlockM + i;
          const float lse = row < p.seqlen_q ? p.lse[stats_offset + row] : -INFINITY;
          shared.lse_log2[state.index()][i] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
          shared.delta[state.index()][i] = row < p.seqlen_q ? params.delta[stats_offset + row] : 0.f;
        }
        pipeline_stats.producer_commit(state);
        ++state;
      }
    } else if (dq_writer_warp) {
      // Adds each query tile's dQ share, once the consumers have staged it, into dq_accum by TMA
      // bulk reductions, issued by lane 0 (a bulk group belongs to the thread that issues it). In
      // deterministic mode it first waits for the key tiles before this one in the band to have
      // added theirs; the consumers wait only when they next need the staging rows.
      const bool issuer = threadIdx.x % 32 == 0;
      float* dq_accum = params.dq_accum + (int64_t(batch) * p.num_heads + head) * dq_accum_rows(p.seqlen_q) * kHeadDim;
      int* semaphores = nullptr;  // this (batch, head)'s turn counters
      if (params.dq_semaphore != nullptr) {
        const int counters = (p.seqlen_q + kDqSemaphoreRowsPerCounter - 1) / kDqSemaphoreRowsPerCounter;
        semaphores = params.dq_semaphore + (int64_t(batch) * p.num_heads + head) * counters;
      }
      named_arrive(Sm90BwdBarrier::kDqFree, kDqSyncThreads);  // nothing staged yet
      PipelineState state;  // the consumers' Q/dO slot of each query tile (kSplitHeadDim stages there)
      for (int m_block = m_begin; m_block < m_end; ++m_block) {
        named_sync(Sm90BwdBarrier::kDqReady, kDqSyncThreads);
        if (issuer) {
          if (semaphores != nullptr) {
            const int turn = n_block - mask.n_block_begin(m_block);
            while (*reinterpret_cast<volatile int*>(semaphores + m_block) != turn) {
            }
          }
          float* dq_tile = dq_accum + int64_t(m_block) * kBlockM * kHeadDim;
          constexpr uint32_t kRowBytes = kHeadDim * sizeof(float);
          if constexpr (kSplitHeadDim) {
            bulk_reduce_add<kBlockM / 2 * kRowBytes>(dq_tile, dq_row(state.index(), 0));
            bulk_reduce_add<kBlockM / 2 * kRowBytes>(dq_tile + kBlockM / 2 * kHeadDim,
                                                     dq_row(state.index(), kBlockM / 2));
          } else {
            bulk_reduce_add<kBlockM * kRowBytes>(dq_tile, dq_row(state.index(), 0));
          }
          bulk_commit();
          if (semaphores != nullptr) {
            bulk_wait_done();  // the sums are in global memory before the turn passes on
            __threadfence();
            atomicAdd(semaphores + m_block, 1);
          }
          bulk_wait_read();
        }
        __syncwarp();
        ++state;
        // The staging rows are free again (the last tile's need not be announced).
        if (m_block + 1 < m_end) named_arrive(Sm90BwdBarrier::kDqFree, kDqSyncThreads);
      }
      if (issuer) bulk_wait_done();  // shared memory must outlive the last reduction
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  constexpr int kSdPQueries = Traits::kSdPQueries;
  constexpr int kDkvCols = Traits::kDkvCols;
  const int consumer = warp_group - 1;
  const int thread_idx = threadIdx.x % 128;
  // This warpgroup's keys (rows of Sᵀ, dK, dV) and dK, dV columns.
  const int key_offset = kSplitHeadDim ? 0 : 64 * consumer;
  const int dkv_col_offset = kSplitHeadDim ? kDkvCols * consumer : 0;

  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadKV mma_dkv;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(thread_idx);
  auto thr_dkv = mma_dkv.get_thread_slice(thread_idx);
  auto thr_dq = mma_dq.get_thread_slice(thread_idx);

  Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});      // (d, kBlockM, slot)
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQt{});  // (d, kBlockM, slot)
  Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});      // (d, kBlockN)
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdS{});     // (kBlockM, kBlockN)
  Tensor sK_mine = local_tile(sK, Shape<_64, Int<kHeadDim>>{}, make_coord(key_offset / 64, 0));  // (64, d)
  Tensor sV_mine = local_tile(sV, Shape<_64, Int<kHeadDim>>{}, make_coord(key_offset / 64, 0));  // (64, d)
  // This warpgroup's block of dQ: 64 query rows × kDqCols head-dim columns.
  const int dq_row_block = consumer / Traits::kDqColBlocks;
  const int dq_col_block = consumer % Traits::kDqColBlocks;
  Tensor sdS_mine = local_tile(sdS, Shape<_64, Int<kBlockN>>{}, make_coord(dq_row_block, 0));  // (64, kBlockN)
  Tensor sKt_mine =
      local_tile(sKt, Shape<Int<Traits::kDqCols>, Int<kBlockN>>{}, make_coord(dq_col_block, 0));  // (kDqCols, kBlockN)

  Tensor tSrK = thr_sdp.partition_fragment_A(sK_mine);   // (MMA, MMA_M, MMA_K)
  Tensor tdPrV = thr_sdp.partition_fragment_A(sV_mine);  // (MMA, MMA_M, MMA_K)
  // Q and dO by blocks of kSdPQueries queries: (MMA, MMA_N, MMA_K, block, 1, slot).
  Tensor tSrQ = thr_sdp.partition_fragment_B(flat_divide(sQ, Shape<Int<kSdPQueries>, Int<kHeadDim>>{}));
  Tensor tdPrdO = thr_sdp.partition_fragment_B(flat_divide(sdO, Shape<Int<kSdPQueries>, Int<kHeadDim>>{}));
  // Their transposes by (kDkvCols head-dim columns, the queries of one dV/dK MMA):
  // (MMA, MMA_N, MMA_K, col block, query block, slot).
  constexpr int kDkvQueries = kSplitHeadDim ? kBlockM : kSdPQueries;
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(flat_divide(sdOt, Shape<Int<kDkvCols>, Int<kDkvQueries>>{}));
  Tensor tdKrQt = thr_dkv.partition_fragment_B(flat_divide(sQt, Shape<Int<kDkvCols>, Int<kDkvQueries>>{}));
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS_mine);  // (MMA, MMA_M, MMA_K)
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt_mine);  // (MMA, MMA_N, MMA_K)

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<_64, Int<kDkvCols>>{});  // (MMA, MMA_M, MMA_N)
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<_64, Int<kDkvCols>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc_dk);
  clear(acc_dv);
  // Pᵀ and dSᵀ in bf16/fp16, the register A operands of dV and dK (kSplitHeadDim: the values
  // stored to shared memory).
  using AccSLayout = decltype(partition_fragment_C(mma_sdp, Shape<_64, Int<kSdPQueries>>{}).layout());
  Tensor tPr = make_tensor<Element>(wgmma_acc_to_a_layout(AccSLayout{}));   // (MMA, MMA_M, MMA_K)
  Tensor tdSr = make_tensor<Element>(wgmma_acc_to_a_layout(AccSLayout{}));  // (MMA, MMA_M, MMA_K)

  // (key, query) in a 64 × kSdPQueries block of Sᵀ (this warpgroup's keys, one query block) of
  // every element this thread holds.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<_64, Int<kSdPQueries>>{}));
  Tensor coords_s = make_tensor(tScS.data(), wgmma_acc_rowcol_layout(tScS.layout()));  // (keys, queries)
  Tensor coords_pds = make_tensor(tScS.data(), wgmma_acc_to_a_layout(tScS.layout()));  // tPr's, tdSr's elements
  Tensor coords_dq = thr_dq.partition_C(make_identity_tensor(Shape<_64, Int<Traits::kDqCols>>{}));
  const float scale_log2 = p.logit_scale * float(M_LOG2E);

  // Stores a block of Pᵀ or dSᵀ as (query, key) elements of a shared-memory tile, two adjacent
  // queries (one 4-byte word there) at a time.
  auto store_pairs = [&](auto const& values, auto& tile, int first_query) {
    CUTE_UNROLL
    for (int i = 0; i < size(values); i += 2) {
      const auto key_query = coords_pds(i);
      const uint32_t pair = uint32_t(values(i).raw()) | (uint32_t(values(i + 1).raw()) << 16);
      *reinterpret_cast<uint32_t*>(&tile(first_query + get<1>(key_query), key_offset + get<0>(key_query))) = pair;
    }
  };

  PipelineState qdo_state, stats_state;  // slot 0, phase 0
  PipelineState held_state;              // kSplitHeadDim: the slot holding the last staged dQ
  bool holding = false;
  if (m_begin < m_end) KVBarrier::wait(&shared.kv_barrier, 0);
  for (int m_block = m_begin; m_block < m_end; ++m_block) {
    const int slot = qdo_state.index();
    pipeline_qdo.consumer_wait(qdo_state);
    pipeline_stats.consumer_wait(stats_state);
    CUTE_UNROLL
    for (int b = 0; b < (kSplitHeadDim ? 1 : kBlockM / 64); ++b) {  // 64 queries at a time: registers
      const int block = kSplitHeadDim ? consumer : b;
      const int first_query = kSdPQueries * block;
      const float* lse_log2 = shared.lse_log2[stats_state.index()] + first_query;
      const float* delta = shared.delta[stats_state.index()] + first_query;
      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<_64, Int<kSdPQueries>>{});   // (MMA, MMA_M, MMA_N)
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<_64, Int<kSdPQueries>>{});  // (MMA, MMA_M, MMA_N)
      wgmma_gemm</*kZeroInit=*/true>(mma_sdp, tSrK, tSrQ(_, _, _, block, 0, slot), acc_s);
      wgmma_gemm</*kZeroInit=*/true>(mma_sdp, tdPrV, tdPrdO(_, _, _, block, 0, slot), acc_dp);
      warpgroup_wait<1>();  // Sᵀ done (and the previous block's dV, dK); dPᵀ may still run
      Tensor scores = wgmma_acc_rowcol(acc_s);  // (keys, queries)
      if (mask.needs_masking(m_block, n_block)) {
        mask.apply_transposed(scores, coords_s, n_block * kBlockN + key_offset, m_block * kBlockM + first_query);
      }
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float row_lse = lse_log2[get<1>(coords_s(0, c))];
        CUTE_UNROLL
        for (int r = 0; r < size<0>(scores); ++r) scores(r, c) = exp2f(scores(r, c) * scale_log2 - row_lse);
      }
      warpgroup_wait<0>();
      Tensor dp = wgmma_acc_rowcol(acc_dp);  // (keys, queries), becomes dSᵀ
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dp); ++c) {
        const float row_delta = delta[get<1>(coords_s(0, c))];
        CUTE_UNROLL
        for (int r = 0; r < size<0>(dp); ++r) dp(r, c) = scores(r, c) * (dp(r, c) - row_delta);
      }
      convert_fragment_into(acc_s, tPr);
      convert_fragment_into(acc_dp, tdSr);
      if constexpr (kSplitHeadDim) {
        Tensor sP = make_tensor(make_smem_ptr(shared.p_or_dq.p.data()), typename Traits::SmemLayoutdS{});
        store_pairs(tPr, sP, first_query);
      } else {
        wgmma_gemm</*kZeroInit=*/false>(mma_dkv, tPr, tdVrdOt(_, _, _, 0, block, slot), acc_dv);
        wgmma_gemm</*kZeroInit=*/false>(mma_dkv, tdSr, tdKrQt(_, _, _, 0, block, slot), acc_dk);
      }
      // dS into shared memory for dQ (while the tensor cores add dV and dK). The previous tile's
      // MMAs finished reading it before the last kDqFree (kSplitHeadDim: kMmasDone) barrier.
      store_pairs(tdSr, sdS, first_query);
    }
    pipeline_stats.consumer_release(stats_state);
    ++stats_state;
    fence_smem_for_async_proxy();
    named_sync(Sm90BwdBarrier::kDsStored, kConsumerThreads);
    if constexpr (kSplitHeadDim) {
      // The previous tile's dQ rows, staged in the slot still held, are read: it returns to the
      // producer.
      named_sync(Sm90BwdBarrier::kDqFree, kDqSyncThreads);
      if (holding) pipeline_qdo.consumer_release(held_state);
      Tensor sPt = make_tensor(make_smem_ptr(shared.p_or_dq.p.data()), typename Traits::SmemLayoutdSt{});
      Tensor sdSt = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdSt{});
      Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);    // (MMA, MMA_M, MMA_K)
      Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);  // (MMA, MMA_M, MMA_K)
      wgmma_gemm</*kZeroInit=*/false>(mma_dkv, tdVrPt, tdVrdOt(_, _, _, consumer, 0, slot), acc_dv);
      wgmma_gemm</*kZeroInit=*/false>(mma_dkv, tdKrdSt, tdKrQt(_, _, _, consumer, 0, slot), acc_dk);
    }
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<_64, Int<Traits::kDqCols>>{});  // (MMA, MMA_M, MMA_N)
    wgmma_gemm</*kZeroInit=*/true>(mma_dq, tdQrdS, tdQrKt, acc_dq);
    warpgroup_wait<0>();  // dV, dK and dQ done: Q, dO, P and dS are read
    if constexpr (kSplitHeadDim) {
      // dQ goes into this slot's Q and dO: both warpgroups must be done reading them. The slot
      // returns to the producer once the reductions have read it (next tile, or never).
      named_sync(Sm90BwdBarrier::kMmasDone, kConsumerThreads);
      held_state = qdo_state;
      holding = true;
    } else {
      pipeline_qdo.consumer_release(qdo_state);
    }
    ++qdo_state;
    // The staging rows are free once the previous tile's reductions have read them.
    if constexpr (!kSplitHeadDim) named_sync(Sm90BwdBarrier::kDqFree, kDqSyncThreads);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int row = 64 * dq_row_block + get<0>(coords_dq(i));
      dq_row(slot, row)[Traits::kDqCols * dq_col_block + get<1>(coords_dq(i))] = acc_dq(i);
    }
    fence_smem_for_async_proxy();
    named_arrive(Sm90BwdBarrier::kDqReady, kDqSyncThreads);  // the writer warp may add the rows
  }

  // ---- Epilogue: dK = softmax_scale · Σ dSᵀQ and dV = Σ PᵀdO, through K's and V's buffers, out
  // by TMA stores. Both warpgroups' last dQ MMAs (which read every key of K) finish first. ----
  named_sync(Sm90BwdBarrier::kMmasDone, kConsumerThreads);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.softmax_scale;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  typename Traits::SmemCopyDkv smem_copy_dkv;
  auto thr_copy_dkv = smem_copy_dkv.get_thread_slice(thread_idx);
  const auto my_block = make_coord(key_offset / 64, dkv_col_offset / kDkvCols);
  copy(smem_copy_dkv, thr_copy_dkv.retile_S(rdK),
       thr_copy_dkv.partition_D(local_tile(sK, Shape<_64, Int<kDkvCols>>{}, my_block)));
  copy(smem_copy_dkv, thr_copy_dkv.retile_S(rdV),
       thr_copy_dkv.partition_D(local_tile(sV, Shape<_64, Int<kDkvCols>>{}, my_block)));
  fence_smem_for_async_proxy();
  named_sync(Sm90BwdBarrier::kDkvStaged, kConsumerThreads);
  if (threadIdx.x == 128) {
    auto store = [&](auto const& tma, auto const& tile) {
      Tensor m = tma.get_tma_tensor(make_shape(p.seqlen_k, Int<kHeadDim>{}, p.num_heads, p.batch));
      Tensor g = local_tile(m(_, _, head, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
      auto [tg, ts] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(tile), group_modes<0, 2>(g));
      copy(tma, ts, tg);
    };
    store(args.tma_dk, sK);
    store(args.tma_dv, sV);
    bulk_commit();
    bulk_wait_done();  // shared memory must outlive the stores' reads of it
  }
#endif
}

}  // namespace jax_flash
