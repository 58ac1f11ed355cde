// Warp-level GEMMs over one tile: operands streamed from shared memory with ldmatrix one k-slice
// ahead of the tensor-core instructions that consume them.
#pragma once

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

// acc += A·Bᵀ with both operands in shared memory.
template <typename Acc, typename FragA, typename FragB, typename SmemA, typename SmemB, typename TiledMma,
          typename CopyA, typename CopyB>
__forceinline__ __device__ void gemm_smem_smem(Acc& acc, FragA& frag_a, FragB& frag_b, SmemA const& smem_a,
                                               SmemB const& smem_b, TiledMma const& tiled_mma,
                                               CopyA const& copy_a, CopyB const& copy_b, int thread_idx) {
  auto thr_copy_a = copy_a.get_thread_slice(thread_idx);
  auto thr_copy_b = copy_b.get_thread_slice(thread_idx);
  Tensor frag_a_view = thr_copy_a.retile_D(frag_a);  // (CPY, CPY_M, CPY_K)
  Tensor frag_b_view = thr_copy_b.retile_D(frag_b);  // (CPY, CPY_N, CPY_K)
  constexpr int kSlices = decltype(size<2>(frag_a))::value;
  copy(copy_a, smem_a(_, _, 0), frag_a_view(_, _, 0));
  copy(copy_b, smem_b(_, _, 0), frag_b_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      copy(copy_a, smem_a(_, _, k + 1), frag_a_view(_, _, k + 1));
      copy(copy_b, smem_b(_, _, k + 1), frag_b_view(_, _, k + 1));
    }
    gemm(tiled_mma, frag_a(_, _, k), frag_b(_, _, k), acc);
  }
}

// acc += A·Bᵀ with A already in registers and B in shared memory.
template <typename Acc, typename FragA, typename FragB, typename SmemB, typename TiledMma, typename CopyB>
__forceinline__ __device__ void gemm_reg_smem(Acc& acc, FragA const& frag_a, FragB& frag_b, SmemB const& smem_b,
                                              TiledMma const& tiled_mma, CopyB const& copy_b, int thread_idx) {
  auto thr_copy_b = copy_b.get_thread_slice(thread_idx);
  Tensor frag_b_view = thr_copy_b.retile_D(frag_b);  // (CPY, CPY_N, CPY_K)
  constexpr int kSlices = decltype(size<2>(frag_a))::value;
  copy(copy_b, smem_b(_, _, 0), frag_b_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      copy(copy_b, smem_b(_, _, k + 1), frag_b_view(_, _, k + 1));
    }
    gemm(tiled_mma, frag_a(_, _, k), frag_b(_, _, k), acc);
  }
}

}  // namespace jax_flash
