// XLA FFI handler of the attention forward pass: checks the buffers XLA hands over, fills
// FlashFwdParams and launches the kernel on XLA's stream. Every failure becomes an ffi::Error.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "ffi_common.h"
#include "ffi_handlers.h"
#include "flash_api.h"
#include "flash_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

constexpr const char* kTarget = "jax_flash_fwd";

ffi::Error FlashFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::RemainingArgs extras, ffi::Result<ffi::AnyBuffer> out_result,
                        ffi::ResultBuffer<ffi::F32> lse_result, float softmax_scale, float softcap,
                        bool alibi, bool mask, bool bias, bool causal, int32_t window_left, int32_t window_right,
                        int32_t dropout_threshold) {
  const ffi::AnyBuffer out = *out_result;
  const ffi::Buffer<ffi::F32> lse = *lse_result;
  if (ffi::Error error = CheckQkv(kTarget, q, k, v); error.failure()) return error;
  if (ffi::Error error = CheckSoftcap(kTarget, softcap); error.failure()) return error;
  const auto q_dims = q.dimensions();
  FLASH_CHECK(kTarget, out.element_type() == q.element_type(), out, "the dtype of q");
  FLASH_CHECK(kTarget, std::equal(q_dims.begin(), q_dims.end(), out.dimensions().begin(), out.dimensions().end()),
              out, "the shape of q: " + Describe("q", q));
  const auto lse_dims = lse.dimensions();
  FLASH_CHECK(kTarget, lse_dims.size() == 3 && lse_dims[0] == q_dims[0] && lse_dims[1] == q_dims[2] &&
                           lse_dims[2] == q_dims[1],
              lse, "[batch, num_heads, seqlen_q] of q: " + Describe("q", q));

  FlashFwdParams params = QkvParams(q, k, v, softmax_scale, softcap, causal, window_left, window_right);
  size_t ranges_begin = 0;
  if (ffi::Error error = SetAlibiSlopes(kTarget, extras, alibi, params, ranges_begin); error.failure()) return error;
  if (ffi::Error error = SetMaskAndBias(kTarget, extras, mask, bias, params, ranges_begin); error.failure()) {
    return error;
  }
  if (ffi::Error error = SetDropout(kTarget, extras, dropout_threshold, params, ranges_begin); error.failure()) {
    return error;
  }
  if (ffi::Error error = SetTokenRanges(kTarget, extras, ranges_begin, false, params); error.failure()) return error;
  params.out = out.untyped_data();
  params.lse = lse.typed_data();
  return CudaStatusToError(run_flash_fwd(params, stream),
                           std::string(kTarget) + " (" + Describe("q", q) + ", " + Describe("k", k) +
                               ", causal=" + (causal ? "true" : "false") + ")");
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashFwd, jax_flash::FlashFwdImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream
                                  .Arg<xla::ffi::AnyBuffer>()  // q [b, sq, h, d] F16 or BF16
                                  .Arg<xla::ffi::AnyBuffer>()  // k [b, sk, hk, d], dtype of q
                                  .Arg<xla::ffi::AnyBuffer>()  // v [b, sk, hk, d], dtype of q
                                  // alibi_slopes (F32 [b, h]) with alibi, mask bits (U32
                                  // [b|1, h|1, sq|1, ceil(sk/128)*4]) with mask, bias (F32, F16,
                                  // BF16 [b|1, h|1, sq|1, sk|1]) with bias, dropout_seed (U32
                                  // [b, 2]) with dropout; then none, or row_ranges, kv_segment_ids
                                  // (S32)
                                  .RemainingArgs()
                                  .Ret<xla::ffi::AnyBuffer>()  // out [b, sq, h, d], dtype of q
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // lse [b, h, sq]
                                  .Attr<float>("softmax_scale")  // logits = scale * q.k
                                  .Attr<float>("softcap")        // > 0: logits = c * tanh(logits / c)
                                  .Attr<bool>("alibi")           // logits -= slope * |i + sk - sq - j|
                                  .Attr<bool>("mask")            // mask operand: hide keys where false
                                  .Attr<bool>("bias")            // bias operand: logits += bias
                                  .Attr<bool>("causal")          // mask j > i + sk - sq
                                  .Attr<int32_t>("window_left")  // mask j < i + sk - sq - left
                                  .Attr<int32_t>("window_right")  // mask j > i + sk - sq + right
                                  .Attr<int32_t>("dropout_threshold"));  // rate · 256, 0: off
