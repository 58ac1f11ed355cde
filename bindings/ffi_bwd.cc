// XLA FFI handler of the attention backward pass: checks the buffers XLA hands over, zeroes the
// dq accumulator workspace (and the deterministic mode's counters), fills FlashBwdParams and
// launches the kernels on XLA's stream. Every failure becomes an ffi::Error.
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

constexpr const char* kTarget = "jax_flash_bwd";

ffi::Error FlashBwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta,
                        ffi::RemainingArgs extras, ffi::Result<ffi::AnyBuffer> dq_result,
                        ffi::Result<ffi::AnyBuffer> dk_result,
                        ffi::Result<ffi::AnyBuffer> dv_result, ffi::ResultBuffer<ffi::F32> dq_accum_result,
                        ffi::ResultBuffer<ffi::S32> dq_semaphore_result,
                        ffi::ResultBuffer<ffi::F32> dalibi_partial_result, ffi::ResultBuffer<ffi::F32> dbias_result,
                        float softmax_scale, float softcap, bool alibi, bool mask, bool bias, bool causal,
                        int32_t window_left, int32_t window_right, bool deterministic, int32_t dropout_threshold) {
  const ffi::AnyBuffer dq = *dq_result;
  const ffi::Buffer<ffi::F32> dq_accum = *dq_accum_result;
  const ffi::AnyBuffer dk = *dk_result;
  const ffi::AnyBuffer dv = *dv_result;
  const ffi::Buffer<ffi::S32> dq_semaphore = *dq_semaphore_result;
  const ffi::Buffer<ffi::F32> dalibi_partial = *dalibi_partial_result;
  const ffi::Buffer<ffi::F32> dbias = *dbias_result;
  if (ffi::Error error = CheckQkv(kTarget, q, k, v); error.failure()) return error;
  if (ffi::Error error = CheckSoftcap(kTarget, softcap); error.failure()) return error;
  const auto q_dims = q.dimensions();
  const int64_t batch = q_dims[0], seqlen_q = q_dims[1], num_heads = q_dims[2], head_dim = q_dims[3];
  const int64_t seqlen_k = k.dimensions()[1];
  const std::string q_shape = "of q: " + Describe("q", q);
  FLASH_CHECK(kTarget, dout.element_type() == q.element_type(), dout, "the dtype of q");
  FLASH_CHECK(kTarget, HasShape(dout, {batch, seqlen_q, num_heads, head_dim}), dout, "the shape " + q_shape);
  FLASH_CHECK(kTarget, HasShape(lse, {batch, num_heads, seqlen_q}), lse, "[batch, num_heads, seqlen_q] " + q_shape);
  FLASH_CHECK(kTarget, HasShape(delta, {batch, num_heads, seqlen_q}), delta,
              "[batch, num_heads, seqlen_q] " + q_shape);
  FLASH_CHECK(kTarget, dq.element_type() == q.element_type() && HasShape(dq, {batch, seqlen_q, num_heads, head_dim}),
              dq, "the shape and dtype " + q_shape);
  FLASH_CHECK(kTarget, HasShape(dq_accum, {batch, num_heads, dq_accum_rows(seqlen_q), head_dim}), dq_accum,
              "[batch, num_heads, seqlen_q rounded up to a multiple of " + std::to_string(kDqAccumRowsMultiple) +
                  ", head_dim] " + q_shape);
  const std::string dkv_expected = "[batch, seqlen_k, num_heads, head_dim] (one per query head) in the dtype " + q_shape;
  FLASH_CHECK(kTarget, dk.element_type() == q.element_type() && HasShape(dk, {batch, seqlen_k, num_heads, head_dim}),
              dk, dkv_expected);
  FLASH_CHECK(kTarget, dv.element_type() == q.element_type() && HasShape(dv, {batch, seqlen_k, num_heads, head_dim}),
              dv, dkv_expected);
  const int64_t counters = (seqlen_q + kDqSemaphoreRowsPerCounter - 1) / kDqSemaphoreRowsPerCounter;
  FLASH_CHECK(kTarget, HasShape(dq_semaphore, {batch, num_heads, counters}), dq_semaphore,
              "[batch, num_heads, ceil(seqlen_q / " + std::to_string(kDqSemaphoreRowsPerCounter) + ")]");
  FLASH_CHECK(kTarget, HasShape(dalibi_partial, {batch, num_heads, alibi ? alibi_partials(seqlen_k) : 0}),
              dalibi_partial,
              "[batch, num_heads, ceil(seqlen_k / " + std::to_string(kAlibiPartialKeys) + ")] with alibi, else "
              "[batch, num_heads, 0]");

  FlashBwdParams params{};
  params.fwd = QkvParams(q, k, v, softmax_scale, softcap, causal, window_left, window_right);
  size_t ranges_begin = 0;
  if (ffi::Error error = SetAlibiSlopes(kTarget, extras, alibi, params.fwd, ranges_begin); error.failure()) {
    return error;
  }
  if (ffi::Error error = SetMaskAndBias(kTarget, extras, mask, bias, params.fwd, ranges_begin); error.failure()) {
    return error;
  }
  // dbias [0]: a bias whose gradient nothing uses.
  const bool bias_grad = bias && !HasShape(dbias, {0});
  if (bias_grad) {
    const auto bias_dims = extras.get<ffi::AnyBuffer>(ranges_begin - 1)->dimensions();
    FLASH_CHECK(kTarget, dbias.dimensions().size() == 4 && std::equal(bias_dims.begin(), bias_dims.end(),
                                                                      dbias.dimensions().begin()),
                dbias, "the bias's shape, or [0]");
  } else {
    FLASH_CHECK(kTarget, HasShape(dbias, {0}), dbias, "[0] without a bias");
  }
  if (ffi::Error error = SetDropout(kTarget, extras, dropout_threshold, params.fwd, ranges_begin); error.failure()) {
    return error;
  }
  if (ffi::Error error = SetTokenRanges(kTarget, extras, ranges_begin, true, params.fwd); error.failure()) return error;
  params.fwd.lse = const_cast<float*>(lse.typed_data());  // read only by the backward
  params.dout = dout.untyped_data();
  params.delta = delta.typed_data();
  params.dq = dq.untyped_data();
  params.dq_accum = dq_accum.typed_data();
  params.dk = dk.untyped_data();
  params.dv = dv.untyped_data();
  params.dkv_head_stride = head_dim;
  params.dkv_row_stride = num_heads * head_dim;
  params.dkv_batch_stride = seqlen_k * num_heads * head_dim;
  params.dq_semaphore = deterministic ? dq_semaphore.typed_data() : nullptr;
  params.dalibi_partial = alibi ? dalibi_partial.typed_data() : nullptr;
  params.dbias = bias_grad ? dbias.typed_data() : nullptr;

  const std::string context = std::string(kTarget) + " (" + Describe("q", q) + ", " + Describe("k", k) +
                              ", causal=" + (causal ? "true" : "false") + ")";
  cudaError_t status = cudaMemsetAsync(dq_accum.untyped_data(), 0, dq_accum.size_bytes(), stream);
  if (status == cudaSuccess && deterministic) {
    status = cudaMemsetAsync(dq_semaphore.untyped_data(), 0, dq_semaphore.size_bytes(), stream);
  }
  if (status == cudaSuccess && alibi) {
    status = cudaMemsetAsync(dalibi_partial.untyped_data(), 0, dalibi_partial.size_bytes(), stream);
  }
  if (status == cudaSuccess && bias_grad) {
    status = cudaMemsetAsync(dbias.untyped_data(), 0, dbias.size_bytes(), stream);
  }
  if (status == cudaSuccess) status = run_flash_bwd(params, stream);
  return CudaStatusToError(status, context);
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashBwd, jax_flash::FlashBwdImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream
                                  .Arg<xla::ffi::AnyBuffer>()  // q [b, sq, h, d] F16 or BF16
                                  .Arg<xla::ffi::AnyBuffer>()  // k [b, sk, hk, d], dtype of q
                                  .Arg<xla::ffi::AnyBuffer>()  // v [b, sk, hk, d], dtype of q
                                  .Arg<xla::ffi::AnyBuffer>()  // dout [b, sq, h, d], dtype of q
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // lse [b, h, sq]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // delta [b, h, sq]
                                  // alibi_slopes (F32 [b, h]) with alibi, the mask's bits and the
                                  // bias (as the forward's) with mask and bias, dropout_seed
                                  // (U32 [b, 2]) with dropout, then none, or row_ranges,
                                  // key_ranges, kv_segment_ids (S32)
                                  .RemainingArgs()
                                  .Ret<xla::ffi::AnyBuffer>()  // dq [b, sq, h, d], dtype of q
                                  .Ret<xla::ffi::AnyBuffer>()  // dk [b, sk, h, d], dtype of q
                                  .Ret<xla::ffi::AnyBuffer>()  // dv [b, sk, h, d], dtype of q
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dq_accum [b, h, ⌈sq⌉128, d]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // dq_semaphore
                                  // dalibi_partial [b, h, ceil(sk / 64)] with alibi, else [b, h, 0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  // dbias, F32 in the bias's shape with bias, else (or unused) [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<float>("softmax_scale")  // logits = scale * q.k
                                  .Attr<float>("softcap")        // > 0: logits = c * tanh(logits / c)
                                  .Attr<bool>("alibi")           // logits -= slope * |i + sk - sq - j|
                                  .Attr<bool>("mask")            // hide keys where the mask is false
                                  .Attr<bool>("bias")            // logits += bias
                                  .Attr<bool>("causal")          // mask j > i + sk - sq
                                  .Attr<int32_t>("window_left")  // mask j < i + sk - sq - left
                                  .Attr<int32_t>("window_right")  // mask j > i + sk - sq + right
                                  .Attr<bool>("deterministic")  // fixed dq summation order
                                  .Attr<int32_t>("dropout_threshold"));  // rate · 256, 0: off
