// Shared by the FFI handlers: descriptions of buffers for error messages, the checks of q, k, v
// that return InvalidArgument, the kernel parameters XLA's dense buffers imply, and CUDA status →
// ffi::Error.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "flash_api.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {

// "q [2, 128, 8, 64] F16"
template <typename Buffer>
std::string Describe(const char* name, const Buffer& buffer) {
  std::ostringstream os;
  os << name << " [";
  const auto dims = buffer.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "] " << buffer.element_type();
  return os.str();
}

// Returns InvalidArgument from the handler of `target`, naming `buffer`, its shape and dtype,
// unless `cond` holds. `expected` is only evaluated on failure.
#define FLASH_CHECK(target, cond, buffer, expected)                                               \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      return ::xla::ffi::Error::InvalidArgument(std::string(target) + ": " +                      \
                                                ::jax_flash::Describe(#buffer, buffer) +          \
                                                ": expected " + (expected));                      \
  } while (0)

inline const std::vector<int>& BuiltHeadDims() {
  static const std::vector<int> dims = [] {
    std::vector<int> dims(32);
    dims.resize(supported_head_dims(dims.data(), static_cast<int>(dims.size())));
    return dims;
  }();
  return dims;
}

inline bool IsBuiltHeadDim(int64_t head_dim) {
  const std::vector<int>& dims = BuiltHeadDims();
  return std::find(dims.begin(), dims.end(), head_dim) != dims.end();
}

inline std::string BuiltHeadDimList() {
  std::ostringstream os;
  const std::vector<int>& dims = BuiltHeadDims();
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  return os.str();
}

// Whether buffer's dimensions are exactly `shape`.
template <typename Buffer>
bool HasShape(const Buffer& buffer, std::initializer_list<int64_t> shape) {
  const auto dims = buffer.dimensions();
  return std::equal(dims.begin(), dims.end(), shape.begin(), shape.end());
}

inline bool AllInIntRange(xla::ffi::Span<const int64_t> dims) {
  return std::all_of(dims.begin(), dims.end(), [](int64_t d) { return d >= 1 && d <= INT_MAX; });
}

// Ranks, dtypes and shapes of q [b, sq, h, d], k and v [b, sk, hk, d] that the kernels take.
inline xla::ffi::Error CheckQkv(const std::string& target, const xla::ffi::AnyBuffer& q,
                                const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v) {
  namespace ffi = xla::ffi;
  FLASH_CHECK(target, q.dimensions().size() == 4, q, "rank 4 [batch, seqlen_q, num_heads, head_dim]");
  FLASH_CHECK(target, k.dimensions().size() == 4, k, "rank 4 [batch, seqlen_k, num_heads_k, head_dim]");
  FLASH_CHECK(target, v.dimensions().size() == 4, v, "rank 4 [batch, seqlen_k, num_heads_k, head_dim]");
  const ffi::DataType dtype = q.element_type();
  FLASH_CHECK(target, dtype == ffi::F16 || dtype == ffi::BF16, q, "dtype F16 or BF16");
  FLASH_CHECK(target, k.element_type() == dtype, k, "the dtype of q");
  FLASH_CHECK(target, v.element_type() == dtype, v, "the dtype of q");

  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  FLASH_CHECK(target, AllInIntRange(q_dims), q, "every dimension in [1, 2^31)");
  FLASH_CHECK(target, AllInIntRange(k_dims), k, "every dimension in [1, 2^31)");
  FLASH_CHECK(target, q_dims[2] % k_dims[2] == 0, k,
              "num_heads_k dividing num_heads = " + std::to_string(q_dims[2]));
  FLASH_CHECK(target, k_dims[0] == q_dims[0] && k_dims[3] == q_dims[3], k,
              "batch and head_dim of q: " + Describe("q", q));
  FLASH_CHECK(target, std::equal(k_dims.begin(), k_dims.end(), v.dimensions().begin()), v,
              "the shape of k: " + Describe("k", k));
  FLASH_CHECK(target, IsBuiltHeadDim(q_dims[3]), q, "head_dim among those built: " + BuiltHeadDimList());
  return ffi::Error::Success();
}

// The parameters of dense row-major q, k, v buffers [batch, seqlen, heads, head_dim] (out, if
// any, shaped as q), checked by CheckQkv.
// window_left, window_right: flash_attention's window_size (-1: unbounded); causal caps the
// right bound at 0. softcap: 0 (off) or > 0.
inline FlashFwdParams QkvParams(const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
                                const xla::ffi::AnyBuffer& v, float softmax_scale, float softcap, bool causal,
                                int32_t window_left, int32_t window_right) {
  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  const int64_t seqlen_q = q_dims[1], num_heads = q_dims[2], head_dim = q_dims[3];
  const int64_t seqlen_k = k_dims[1], num_heads_k = k_dims[2];
  FlashFwdParams params{};
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.q_head_stride = params.out_head_stride = head_dim;
  params.q_row_stride = params.out_row_stride = num_heads * head_dim;
  params.q_batch_stride = params.out_batch_stride = seqlen_q * num_heads * head_dim;
  params.k_head_stride = params.v_head_stride = head_dim;
  params.k_row_stride = params.v_row_stride = num_heads_k * head_dim;
  params.k_batch_stride = params.v_batch_stride = seqlen_k * num_heads_k * head_dim;
  params.batch = static_cast<int>(q_dims[0]);
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.seqlen_k = static_cast<int>(seqlen_k);
  params.num_heads = static_cast<int>(num_heads);
  params.num_heads_k = static_cast<int>(num_heads_k);
  params.head_dim = static_cast<int>(head_dim);
  params.softmax_scale = softmax_scale;
  params.softcap = softcap;
  params.window_left = window_left < 0 ? -1 : window_left;
  params.window_right = window_right < 0 ? (causal ? 0 : -1) : (causal ? std::min(window_right, 0) : window_right);
  params.dtype = q.element_type() == xla::ffi::F16 ? DType::kFloat16 : DType::kBFloat16;
  return params;
}

// The packed-sequence operands, from index `first` of the remaining ones: none, or row_ranges
// [b, sq, 4], then key_ranges [b, sk, 2] when with_key_ranges (the backward), then kv_segment_ids
// [b, sk], all S32.
inline xla::ffi::Error SetTokenRanges(const std::string& target, const xla::ffi::RemainingArgs& extras,
                                      size_t first, bool with_key_ranges, FlashFwdParams& params) {
  namespace ffi = xla::ffi;
  const size_t count = extras.size() - first;
  if (count == 0) return ffi::Error::Success();
  const size_t expected = with_key_ranges ? 3 : 2;
  if (count != expected) {
    return ffi::Error::InvalidArgument(target + ": expected " + std::to_string(expected) +
                                       " packed-sequence operands, got " + std::to_string(count));
  }
  const int64_t batch = params.batch, seqlen_q = params.seqlen_q, seqlen_k = params.seqlen_k;
  auto get = [&](size_t index, std::initializer_list<int64_t> shape, const char* name,
                 const int*& data) -> ffi::Error {
    auto buffer = extras.get<ffi::Buffer<ffi::S32>>(index);
    if (buffer.has_error()) return ffi::Error::InvalidArgument(target + ": " + name + ": expected S32");
    const auto dims = buffer->dimensions();
    if (!std::equal(dims.begin(), dims.end(), shape.begin(), shape.end())) {
      return ffi::Error::InvalidArgument(target + ": " + Describe(name, *buffer) + ": wrong shape");
    }
    data = buffer->typed_data();
    return ffi::Error::Success();
  };
  size_t index = first;
  if (ffi::Error e = get(index++, {batch, seqlen_q, 4}, "row_ranges", params.row_ranges); e.failure()) return e;
  if (with_key_ranges) {
    if (ffi::Error e = get(index++, {batch, seqlen_k, 2}, "key_ranges", params.key_ranges); e.failure()) return e;
  }
  return get(index, {batch, seqlen_k}, "kv_segment_ids", params.kv_segment_ids);
}

// With ALiBi, the first remaining operand: alibi_slopes F32 [batch, num_heads]. rest_begin gets the
// index of the operands after it (mask, bias, the packed-sequence ones).
inline xla::ffi::Error SetAlibiSlopes(const std::string& target, const xla::ffi::RemainingArgs& extras, bool alibi,
                                      FlashFwdParams& params, size_t& rest_begin) {
  namespace ffi = xla::ffi;
  rest_begin = 0;
  if (!alibi) return ffi::Error::Success();
  auto slopes = extras.get<ffi::Buffer<ffi::F32>>(0);
  if (slopes.has_error()) return ffi::Error::InvalidArgument(target + ": alibi_slopes: expected F32 operand");
  const auto dims = slopes->dimensions();
  if (dims.size() != 2 || dims[0] != params.batch || dims[1] != params.num_heads) {
    return ffi::Error::InvalidArgument(target + ": " + Describe("alibi_slopes", *slopes) +
                                       ": expected [batch, num_heads]");
  }
  params.alibi_slopes = slopes->typed_data();
  rest_begin = 1;
  return ffi::Error::Success();
}

// Each of a mask's or bias's 4 dimensions is 1 or that of `full`; strides (in elements) of the
// dense row-major buffer, 0 along dimensions of size 1.
template <typename Buffer>
bool BroadcastStrides(const Buffer& buffer, const int64_t (&full)[4], int64_t (&strides)[4]) {
  const auto dims = buffer.dimensions();
  if (dims.size() != 4) return false;
  int64_t stride = 1;
  for (int i = 3; i >= 0; --i) {
    if (dims[i] != 1 && dims[i] != full[i]) return false;
    strides[i] = dims[i] == 1 ? 0 : stride;
    stride *= dims[i];
  }
  return true;
}

// From extras[index]: the mask when `mask` (U32 bits, see PackedMask), then the bias when `bias`
// (F32, F16 or BF16 broadcastable to [batch, num_heads, seqlen_q, seqlen_k]). index ends past them.
inline xla::ffi::Error SetMaskAndBias(const std::string& target, const xla::ffi::RemainingArgs& extras, bool mask,
                                      bool bias, FlashFwdParams& params, size_t& index) {
  namespace ffi = xla::ffi;
  int64_t strides[4];
  if (mask) {
    auto bits = extras.get<ffi::AnyBuffer>(index++);
    if (bits.has_error()) return ffi::Error::InvalidArgument(target + ": missing operand mask");
    const int64_t words = (params.seqlen_k + kMaskRowKeys - 1) / kMaskRowKeys * (kMaskRowKeys / 32);
    const int64_t full[4] = {params.batch, params.num_heads, params.seqlen_q, words};
    FLASH_CHECK(target, bits->element_type() == ffi::U32 && BroadcastStrides(*bits, full, strides) &&
                            bits->dimensions()[3] == words,
                *bits, "U32 [batch | 1, num_heads | 1, seqlen_q | 1, " + std::to_string(words) + "] mask bits");
    params.mask = {static_cast<const uint32_t*>(bits->untyped_data()), strides[0], strides[1], strides[2]};
  }
  if (bias) {
    auto values = extras.get<ffi::AnyBuffer>(index++);
    if (values.has_error()) return ffi::Error::InvalidArgument(target + ": missing operand bias");
    const ffi::DataType dtype = values->element_type();
    const int64_t full[4] = {params.batch, params.num_heads, params.seqlen_q, params.seqlen_k};
    FLASH_CHECK(target, (dtype == ffi::F32 || dtype == ffi::F16 || dtype == ffi::BF16) &&
                            BroadcastStrides(*values, full, strides),
                *values, "F32, F16 or BF16 broadcastable to [batch, num_heads, seqlen_q, seqlen_k]");
    params.bias = {values->untyped_data(), strides[0], strides[1], strides[2], strides[3],
                   dtype == ffi::F16    ? BiasDType::kFloat16
                   : dtype == ffi::BF16 ? BiasDType::kBFloat16
                                        : BiasDType::kFloat32};
  }
  return ffi::Error::Success();
}

// With dropout (threshold > 0), extras[index]: the seed, U32 [batch, 2]. index ends past it.
inline xla::ffi::Error SetDropout(const std::string& target, const xla::ffi::RemainingArgs& extras, int32_t threshold,
                                  FlashFwdParams& params, size_t& index) {
  namespace ffi = xla::ffi;
  if (threshold < 0 || threshold > 0xFF) {
    return ffi::Error::InvalidArgument(target + ": dropout_threshold = " + std::to_string(threshold) +
                                       ": expected 0 (off) to 255");
  }
  if (threshold == 0) return ffi::Error::Success();
  auto seed = extras.get<ffi::AnyBuffer>(index++);
  if (seed.has_error()) return ffi::Error::InvalidArgument(target + ": missing operand dropout_seed");
  FLASH_CHECK(target, seed->element_type() == ffi::U32 && HasShape(*seed, {params.batch, 2}), *seed,
              "U32 [batch, 2] dropout_seed");
  params.dropout = {static_cast<const uint32_t*>(seed->untyped_data()), static_cast<uint32_t>(threshold), 1.f};
  return ffi::Error::Success();
}

// softcap must be 0 (off) or positive and finite: the kernels divide by it.
inline xla::ffi::Error CheckSoftcap(const std::string& target, float softcap) {
  if (softcap >= 0.f && std::isfinite(softcap)) return xla::ffi::Error::Success();
  return xla::ffi::Error::InvalidArgument(target + ": softcap = " + std::to_string(softcap) +
                                          ": expected 0 (off) or a finite positive value");
}

// InvalidArgument for parameters the kernels reject, Internal for any other CUDA failure.
inline xla::ffi::Error CudaStatusToError(cudaError_t status, const std::string& context) {
  if (status == cudaSuccess) return xla::ffi::Error::Success();
  const std::string message =
      context + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
  if (status == cudaErrorInvalidValue) return xla::ffi::Error::InvalidArgument(message);
  return xla::ffi::Error::Internal(message);
}

}  // namespace jax_flash
