// How a key tile adds its share of dQ for one query tile into the float32 dq_accum buffer.
// SM80: red.global.add straight from the MMA registers. SM90: the tile is staged in shared memory
// and added by the TMA unit (cp.reduce.async.bulk), one row per thread, so that the reductions
// leave the load/store pipe that feeds the tensor cores (on SM80 they took ~17% of the stall samples
// of the backward at d 128 on an H200).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

// dq_accum[rows, cols] += acc for the rows below num_rows; acc and coords are rows × cols views
// whose neighbouring column pairs are adjacent in memory.
template <typename Acc, typename Coords>
__forceinline__ __device__ void add_dq_atomic(float* dq_accum, int64_t row_stride, Acc const& acc,
                                              Coords const& coords, int num_rows) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(acc); ++r) {
    const int row = get<0>(coords(r, 0));
    if (row >= num_rows) continue;
    float* dst = dq_accum + row * row_stride;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc); c += 2) {
      const int col = get<1>(coords(r, c));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst + col), make_float2(acc(r, c), acc(r, c + 1)));
#else
      atomicAdd(dst + col, acc(r, c));
      atomicAdd(dst + col + 1, acc(r, c + 1));
#endif
    }
  }
}

// Shared-memory staging of one (kBlockM, kHeadDim) float tile. Rows are padded by 8 floats, so the
// 8 rows that one warp's float2 stores touch fall on distinct banks; each row stays 16-byte aligned
// for the bulk copy.
template <int kBlockM, int kHeadDim>
struct DqStaging {
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kBytes = kBlockM * kRowStride * int(sizeof(float));

  float* smem;

  template <typename Acc, typename Coords>
  __forceinline__ __device__ void store(Acc const& acc, Coords const& coords) const {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(acc); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc); c += 2) {
        const int row = get<0>(coords(r, c)), col = get<1>(coords(r, c));
        *reinterpret_cast<float2*>(smem + row * kRowStride + col) = make_float2(acc(r, c), acc(r, c + 1));
      }
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Makes this thread's stores visible to the TMA unit; a barrier must follow before reduce().
  __forceinline__ __device__ static void fence() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

  // Thread t < num_rows adds row t into dq_accum (rows row_stride floats apart).
  __forceinline__ __device__ void reduce(float* dq_accum, int64_t row_stride, int num_rows, int thread_idx) const {
    if (thread_idx >= num_rows || thread_idx >= kBlockM) return;
    const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(smem + thread_idx * kRowStride));
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 :
                 : "l"(dq_accum + thread_idx * row_stride), "r"(src), "n"(kHeadDim * int(sizeof(float)))
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }

  // The issuing threads' reductions have read the staging buffer (it may be overwritten after a
  // barrier).
  __forceinline__ __device__ static void wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
  // The issuing threads' reductions are complete in global memory.
  __forceinline__ __device__ static void wait_done() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
#endif
};

}  // namespace jax_flash
