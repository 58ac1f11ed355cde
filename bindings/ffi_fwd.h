// XLA FFI handler of the attention forward pass (defined in ffi_fwd.cc, built only with CUDA).
#pragma once

#include "xla/ffi/api/api.h"

// Custom call target "jax_flash_fwd": q, k, v -> out, lse. See ffi_fwd.cc for the signature.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashFwd);
