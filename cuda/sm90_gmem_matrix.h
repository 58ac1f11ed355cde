// The [batch, seqlen, heads, head dim] buffers as the Hopper kernels' TMA descriptors see them:
// (seqlen, head dim, heads, batch) tensors, head dim contiguous. Rows past seqlen arrive as zeros.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

namespace jax_flash {

using namespace cute;

template <int kHeadDim, typename Element>
using Sm90GmemMatrix = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                            Shape<int32_t, Int<kHeadDim>, int32_t, int32_t>{},
                                            Stride<int64_t, _1, int64_t, int64_t>{}));

template <int kHeadDim, typename Element>
Sm90GmemMatrix<kHeadDim, Element> sm90_gmem_matrix(const void* data, int seqlen, int heads, int batch,
                                                   int64_t row_stride, int64_t head_stride, int64_t batch_stride) {
  return make_tensor(make_gmem_ptr(static_cast<Element const*>(data)), make_shape(seqlen, Int<kHeadDim>{}, heads, batch),
                     make_stride(row_stride, _1{}, head_stride, batch_stride));
}

}  // namespace jax_flash
