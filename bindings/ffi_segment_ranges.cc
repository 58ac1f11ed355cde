// XLA FFI handler that builds the kernels' packed-sequence ranges from segment ids (see
// cuda/segment_ranges.h): checks the buffers, launches on XLA's stream.
#include <cuda_runtime_api.h>

#include <string>

#include "ffi_common.h"
#include "ffi_handlers.h"
#include "segment_ranges.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

constexpr const char* kTarget = "jax_flash_segment_ranges";

ffi::Error SegmentRangesImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> q_ids, ffi::Buffer<ffi::S32> kv_ids,
                             ffi::RemainingArgs positions, ffi::ResultBuffer<ffi::S32> row_ranges_result,
                             ffi::ResultBuffer<ffi::S32> key_ranges_result,
                             ffi::ResultBuffer<ffi::S32> workspace_result, int32_t window_left,
                             int32_t window_right) {
  const ffi::Buffer<ffi::S32> row_ranges = *row_ranges_result;
  const ffi::Buffer<ffi::S32> key_ranges = *key_ranges_result;
  const ffi::Buffer<ffi::S32> workspace = *workspace_result;
  FLASH_CHECK(kTarget, q_ids.dimensions().size() == 2 && AllInIntRange(q_ids.dimensions()), q_ids,
              "[batch, seqlen_q], every dimension in [1, 2^31)");
  const int64_t batch = q_ids.dimensions()[0], seqlen_q = q_ids.dimensions()[1];
  FLASH_CHECK(kTarget, kv_ids.dimensions().size() == 2 && kv_ids.dimensions()[0] == batch &&
                           AllInIntRange(kv_ids.dimensions()),
              kv_ids, "[batch, seqlen_k] with the batch of " + Describe("q_ids", q_ids));
  const int64_t seqlen_k = kv_ids.dimensions()[1];
  // The hash tables hold 2·seqlen slots rounded up to a power of two, in int.
  constexpr int64_t kMaxSeqlen = int64_t(1) << 29;
  FLASH_CHECK(kTarget, seqlen_q <= kMaxSeqlen, q_ids, "seqlen_q at most 2^29");
  FLASH_CHECK(kTarget, seqlen_k <= kMaxSeqlen, kv_ids, "seqlen_k at most 2^29");
  FLASH_CHECK(kTarget, HasShape(row_ranges, {batch, seqlen_q, 4}), row_ranges, "[batch, seqlen_q, 4]");
  FLASH_CHECK(kTarget, HasShape(key_ranges, {batch, seqlen_k, 2}), key_ranges, "[batch, seqlen_k, 2]");
  const int64_t workspace_ints = segment_ranges_workspace_ints(int(batch), int(seqlen_q), int(seqlen_k));
  FLASH_CHECK(kTarget, HasShape(workspace, {workspace_ints}), workspace, "[" + std::to_string(workspace_ints) + "]");

  SegmentRangesParams params{};
  params.q_ids = q_ids.typed_data();
  params.kv_ids = kv_ids.typed_data();
  const auto bad_positions = [] {
    return ffi::Error::InvalidArgument(std::string(kTarget) +
                                       ": expected no positions or q_positions, kv_positions (S32)");
  };
  if (positions.size() != 0 && positions.size() != 2) return bad_positions();
  if (positions.size() == 2) {
    const auto q_pos = positions.get<ffi::Buffer<ffi::S32>>(0);
    const auto kv_pos = positions.get<ffi::Buffer<ffi::S32>>(1);
    if (q_pos.has_error() || kv_pos.has_error()) return bad_positions();
    const ffi::Buffer<ffi::S32> q_positions = *q_pos, kv_positions = *kv_pos;
    FLASH_CHECK(kTarget, HasShape(q_positions, {batch, seqlen_q}), q_positions,
                "the shape of " + Describe("q_ids", q_ids));
    FLASH_CHECK(kTarget, HasShape(kv_positions, {batch, seqlen_k}), kv_positions,
                "the shape of " + Describe("kv_ids", kv_ids));
    params.q_pos = q_positions.typed_data();
    params.kv_pos = kv_positions.typed_data();
  }
  params.batch = int(batch);
  params.seqlen_q = int(seqlen_q);
  params.seqlen_k = int(seqlen_k);
  params.window_left = window_left < 0 ? -1 : window_left;
  params.window_right = window_right < 0 ? -1 : window_right;
  params.row_ranges = reinterpret_cast<int4*>(row_ranges.typed_data());
  params.key_ranges = reinterpret_cast<int2*>(key_ranges.typed_data());
  params.workspace = workspace.typed_data();
  return CudaStatusToError(run_segment_ranges(params, stream), std::string(kTarget) + " (" +
                                                                   Describe("q_ids", q_ids) + ", " +
                                                                   Describe("kv_ids", kv_ids) + ")");
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegmentRanges, jax_flash::SegmentRangesImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // q_segment_ids [b, sq]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // kv_segment_ids [b, sk]
                                  .RemainingArgs()  // none, or q_positions [b, sq], kv_positions [b, sk]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // row_ranges [b, sq, 4]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // key_ranges [b, sk, 2]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // workspace (hash tables)
                                  .Attr<int32_t>("window_left")    // < 0: unbounded
                                  .Attr<int32_t>("window_right"));  // < 0: unbounded; causal: 0
