// XLA FFI handlers of the attention kernels (defined in ffi_fwd.cc and ffi_bwd.cc, built only
// with CUDA).
#pragma once

#include "xla/ffi/api/api.h"

// Custom call target "jax_flash_fwd": q, k, v -> out, lse. See ffi_fwd.cc for the signature.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashFwd);

// Custom call target "jax_flash_bwd": q, k, v, dout, lse, delta -> dq_accum, dk, dv, dq_semaphore.
// See ffi_bwd.cc for the signature.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashBwd);
