// How a key tile adds its share of dQ for one query tile into the float32 dq_accum workspace, and
// how dq is read back out of it.
//
// A query tile's dq_accum is one contiguous block of kBlockM·d floats, holding the dQ MMA's
// accumulators in thread order: float4 chunk c of thread t at chunk index c·kNThreads + t (so a
// warp's chunks are adjacent). Every key tile adds its whole block at once: on SM90 the tile is
// staged in shared memory in that order and added by the TMA unit in one bulk reduction, which
// keeps the reductions off the load/store pipe that feeds the tensor cores (+33% backward at d128
// on an H200 over per-thread atomics); on SM80 with red.global.add from registers. Afterwards
// convert_dq scales each tile's block and scatters it into dq's [seqlen, heads, d] rows.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

#include "sm90_bulk_async.h"

namespace jax_flash {

using namespace cute;

template <int kBlockM, int kHeadDim, int kNThreads>
struct DqTileLayout {
  static constexpr int kFloats = kBlockM * kHeadDim;
  static constexpr int kChunksPerThread = kFloats / kNThreads / 4;
  static_assert(kFloats % (4 * kNThreads) == 0, "each thread holds whole float4 chunks of the dQ tile");

  __forceinline__ __device__ static int chunk_offset(int chunk, int thread_idx) {
    return (chunk * kNThreads + thread_idx) * 4;
  }
};

// acc: this thread's dQ accumulators (any register tensor of kBlockM·d / kNThreads floats).
template <int kBlockM, int kHeadDim, int kNThreads, typename Acc>
__forceinline__ __device__ void add_dq_atomic(float* dq_tile, Acc const& acc, int thread_idx) {
  using Tile = DqTileLayout<kBlockM, kHeadDim, kNThreads>;
  static_assert(decltype(size(acc))::value == 4 * Tile::kChunksPerThread);
  CUTE_UNROLL
  for (int c = 0; c < Tile::kChunksPerThread; ++c) {
    float* dst = dq_tile + Tile::chunk_offset(c, thread_idx);
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) atomicAdd(dst + j, acc(4 * c + j));
  }
}

// The shared-memory staging tile of the SM90 path, in dq_accum's order.
template <int kBlockM, int kHeadDim, int kNThreads>
struct DqStaging {
  using Tile = DqTileLayout<kBlockM, kHeadDim, kNThreads>;
  static constexpr int kBytes = Tile::kFloats * int(sizeof(float));

  float* smem;

  template <typename Acc>
  __forceinline__ __device__ void store(Acc const& acc, int thread_idx) const {
    CUTE_UNROLL
    for (int c = 0; c < Tile::kChunksPerThread; ++c) {
      *reinterpret_cast<float4*>(smem + Tile::chunk_offset(c, thread_idx)) =
          make_float4(acc(4 * c), acc(4 * c + 1), acc(4 * c + 2), acc(4 * c + 3));
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // One thread adds the whole staged tile into dq_tile (after fence_smem_for_async_proxy() and a
  // barrier); bulk_wait_read() and bulk_wait_done() wait for it.
  __forceinline__ __device__ void reduce(float* dq_tile) const {
    bulk_reduce_add<kBytes>(dq_tile, smem);
    bulk_commit();
  }
#endif
};

}  // namespace jax_flash
