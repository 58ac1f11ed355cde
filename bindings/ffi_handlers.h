// XLA FFI handlers of the attention kernels and of their packed-sequence ranges (defined in
// ffi_fwd.cc, ffi_bwd.cc and ffi_segment_ranges.cc, built only with CUDA).
#pragma once

#include "xla/ffi/api/api.h"

// Custom call target "jax_flash_fwd": q, k, v -> out, lse. See ffi_fwd.cc for the signature.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashFwd);

// Custom call target "jax_flash_bwd": q, k, v, dout, lse, delta -> dq_accum, dk, dv, dq_semaphore.
// See ffi_bwd.cc for the signature.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashBwd);

// Custom call target "jax_flash_segment_ranges": q_segment_ids, kv_segment_ids [, q_positions,
// kv_positions] -> row_ranges, key_ranges, workspace. See ffi_segment_ranges.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(SegmentRanges);
