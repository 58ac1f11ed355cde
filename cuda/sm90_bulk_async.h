// The SM90 async proxy from one thread's side: making shared-memory stores visible to it, and TMA
// bulk reductions of float32 rows from shared into global memory (the backward kernels' dQ sums).
#pragma once

#include <cstdint>

namespace jax_flash {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Makes the shared memory this thread wrote with ordinary stores or cp.async visible to the async
// proxy's reads (tensor cores, TMA) that follow the next barrier.
__forceinline__ __device__ void fence_smem_for_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Adds kBytes of floats at src (shared memory, 16-byte aligned) into dst (global memory) in the
// issuing thread's current bulk group; bulk_commit() closes the group.
template <uint32_t kBytes>
__forceinline__ __device__ void bulk_reduce_add(float* dst, const float* src) {
  const uint32_t src_smem = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
               :
               : "l"(dst), "r"(src_smem), "n"(kBytes)
               : "memory");
}

__forceinline__ __device__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// The issuing thread's bulk reductions have read their shared memory (it may be overwritten after
// a barrier).
__forceinline__ __device__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

// The issuing thread's bulk reductions are complete in global memory.
__forceinline__ __device__ void bulk_wait_done() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
#endif

}  // namespace jax_flash
