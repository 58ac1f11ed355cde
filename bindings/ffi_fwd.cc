// XLA FFI handler of the attention forward pass: checks the buffers XLA hands over, fills
// FlashFwdParams and launches the kernel on XLA's stream. Every failure becomes an ffi::Error.
#include "ffi_fwd.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "flash_api.h"
#include "flash_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

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

// Returns InvalidArgument naming `buffer`, its shape and dtype, unless `cond` holds. `expected`
// is only evaluated on failure.
#define FLASH_CHECK(cond, buffer, expected)                                                       \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      return ffi::Error::InvalidArgument("jax_flash_fwd: " + Describe(#buffer, buffer) +         \
                                         ": expected " + (expected));                            \
  } while (0)

const std::vector<int>& BuiltHeadDims() {
  static const std::vector<int> dims = [] {
    std::vector<int> dims(32);
    dims.resize(supported_head_dims(dims.data(), static_cast<int>(dims.size())));
    return dims;
  }();
  return dims;
}

std::string Join(const std::vector<int>& values) {
  std::ostringstream os;
  for (size_t i = 0; i < values.size(); ++i) os << (i ? ", " : "") << values[i];
  return os.str();
}

ffi::Error FlashFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> out_result,
                        ffi::ResultBuffer<ffi::F32> lse_result, float softmax_scale, bool causal) {
  const ffi::AnyBuffer out = *out_result;
  const ffi::Buffer<ffi::F32> lse = *lse_result;

  // --- Ranks and dtypes -------------------------------------------------------------------------
  FLASH_CHECK(q.dimensions().size() == 4, q, "rank 4 [batch, seqlen_q, num_heads, head_dim]");
  FLASH_CHECK(k.dimensions().size() == 4, k, "rank 4 [batch, seqlen_k, num_heads_k, head_dim]");
  FLASH_CHECK(v.dimensions().size() == 4, v, "rank 4 [batch, seqlen_k, num_heads_k, head_dim]");
  FLASH_CHECK(out.dimensions().size() == 4, out, "rank 4, the shape of q");
  FLASH_CHECK(lse.dimensions().size() == 3, lse, "rank 3 [batch, num_heads, seqlen_q]");

  const ffi::DataType dtype = q.element_type();
  FLASH_CHECK(dtype == ffi::F16 || dtype == ffi::BF16, q, "dtype F16 or BF16");
  FLASH_CHECK(k.element_type() == dtype, k, "the dtype of q");
  FLASH_CHECK(v.element_type() == dtype, v, "the dtype of q");
  FLASH_CHECK(out.element_type() == dtype, out, "the dtype of q");

  // --- Shapes -----------------------------------------------------------------------------------
  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  const int64_t batch = q_dims[0], seqlen_q = q_dims[1], num_heads = q_dims[2];
  const int64_t head_dim = q_dims[3], seqlen_k = k_dims[1], num_heads_k = k_dims[2];
  const bool q_fits_int = std::all_of(q_dims.begin(), q_dims.end(),
                                      [](int64_t d) { return d >= 1 && d <= INT_MAX; });
  FLASH_CHECK(q_fits_int, q, "every dimension in [1, 2^31)");
  FLASH_CHECK(seqlen_k >= 1 && seqlen_k <= INT_MAX, k, "seqlen_k in [1, 2^31)");
  FLASH_CHECK(num_heads_k >= 1 && num_heads % num_heads_k == 0, k,
              "num_heads_k dividing num_heads = " + std::to_string(num_heads));
  FLASH_CHECK(k_dims[0] == batch && k_dims[3] == head_dim, k,
              "batch and head_dim of q: " + Describe("q", q));
  FLASH_CHECK(std::equal(k_dims.begin(), k_dims.end(), v.dimensions().begin()), v,
              "the shape of k: " + Describe("k", k));
  FLASH_CHECK(std::equal(q_dims.begin(), q_dims.end(), out.dimensions().begin()), out,
              "the shape of q: " + Describe("q", q));
  const auto lse_dims = lse.dimensions();
  FLASH_CHECK(lse_dims[0] == batch && lse_dims[1] == num_heads && lse_dims[2] == seqlen_q, lse,
              "[batch, num_heads, seqlen_q] of q: " + Describe("q", q));
  const std::vector<int>& head_dims = BuiltHeadDims();
  FLASH_CHECK(std::find(head_dims.begin(), head_dims.end(), head_dim) != head_dims.end(), q,
              "head_dim among those built: " + Join(head_dims));

  // --- Launch -----------------------------------------------------------------------------------
  FlashFwdParams params{};
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.out = out.untyped_data();
  params.lse = lse.typed_data();
  // XLA buffers are dense and row-major: [batch, seqlen, heads, head_dim].
  params.q_head_stride = params.out_head_stride = head_dim;
  params.q_row_stride = params.out_row_stride = num_heads * head_dim;
  params.q_batch_stride = params.out_batch_stride = seqlen_q * num_heads * head_dim;
  params.k_head_stride = params.v_head_stride = head_dim;
  params.k_row_stride = params.v_row_stride = num_heads_k * head_dim;
  params.k_batch_stride = params.v_batch_stride = seqlen_k * num_heads_k * head_dim;
  params.batch = static_cast<int>(batch);
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.seqlen_k = static_cast<int>(seqlen_k);
  params.num_heads = static_cast<int>(num_heads);
  params.num_heads_k = static_cast<int>(num_heads_k);
  params.head_dim = static_cast<int>(head_dim);
  params.softmax_scale = softmax_scale;
  params.is_causal = causal;
  params.dtype = dtype == ffi::F16 ? DType::kFloat16 : DType::kBFloat16;

  const cudaError_t status = run_flash_fwd(params, stream);
  if (status == cudaSuccess) return ffi::Error::Success();
  const std::string message = std::string("jax_flash_fwd: ") + cudaGetErrorName(status) + ": " +
                              cudaGetErrorString(status) + " (" + Describe("q", q) + ", " +
                              Describe("k", k) + ", causal=" + (causal ? "true" : "false") + ")";
  if (status == cudaErrorInvalidValue) return ffi::Error::InvalidArgument(message);
  return ffi::Error::Internal(message);
}

#undef FLASH_CHECK

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashFwd, jax_flash::FlashFwdImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream
                                  .Arg<xla::ffi::AnyBuffer>()  // q [b, sq, h, d] F16 or BF16
                                  .Arg<xla::ffi::AnyBuffer>()  // k [b, sk, hk, d], dtype of q
                                  .Arg<xla::ffi::AnyBuffer>()  // v [b, sk, hk, d], dtype of q
                                  .Ret<xla::ffi::AnyBuffer>()  // out [b, sq, h, d], dtype of q
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // lse [b, h, sq]
                                  .Attr<float>("softmax_scale")  // logits = scale * q.k
                                  .Attr<bool>("causal"));        // mask j > i + sk - sq
