// Dispatch of the forward pass: checks what the kernels assume, then picks the instantiation for
// the head dim and element type. Only head dims compiled into this build (JAX_FLASH_HDIM_<D>) exist.
#include <cutlass/numeric_types.h>

#include "flash_api.h"

namespace jax_flash {

template <int kHeadDim, typename Element>
cudaError_t run_flash_fwd_hdim(const FlashFwdParams& params, cudaStream_t stream);

namespace {

// Head dims compiled into this build, ascending.
constexpr int kCompiledHeadDims[] = {
#ifdef JAX_FLASH_HDIM_32
    32,
#endif
#ifdef JAX_FLASH_HDIM_64
    64,
#endif
#ifdef JAX_FLASH_HDIM_96
    96,
#endif
#ifdef JAX_FLASH_HDIM_128
    128,
#endif
#ifdef JAX_FLASH_HDIM_160
    160,
#endif
#ifdef JAX_FLASH_HDIM_192
    192,
#endif
#ifdef JAX_FLASH_HDIM_224
    224,
#endif
#ifdef JAX_FLASH_HDIM_256
    256,
#endif
    0,  // keeps the array non-empty when no head dim is compiled
};
constexpr int kNumCompiledHeadDims = sizeof(kCompiledHeadDims) / sizeof(int) - 1;

template <typename Element>
cudaError_t run_for_element(const FlashFwdParams& params, cudaStream_t stream) {
  switch (params.head_dim) {
#ifdef JAX_FLASH_HDIM_32
    case 32: return run_flash_fwd_hdim<32, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_64
    case 64: return run_flash_fwd_hdim<64, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_96
    case 96: return run_flash_fwd_hdim<96, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_128
    case 128: return run_flash_fwd_hdim<128, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_160
    case 160: return run_flash_fwd_hdim<160, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_192
    case 192: return run_flash_fwd_hdim<192, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_224
    case 224: return run_flash_fwd_hdim<224, Element>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_256
    case 256: return run_flash_fwd_hdim<256, Element>(params, stream);
#endif
    default: return cudaErrorInvalidValue;
  }
}

bool params_are_valid(const FlashFwdParams& p) {
  constexpr int kMaxGridDim = 65535;  // grid y (heads) and z (batch)
  return p.batch >= 1 && p.batch <= kMaxGridDim && p.num_heads >= 1 && p.num_heads <= kMaxGridDim &&
         p.num_heads_k >= 1 && p.num_heads % p.num_heads_k == 0 && p.seqlen_q >= 1 && p.seqlen_k >= 1 &&
         p.q && p.k && p.v && p.out && p.lse;
}

}  // namespace

int supported_head_dims(int* dims, int capacity) {
  int n = 0;
  for (int i = 0; i < kNumCompiledHeadDims && n < capacity; ++i) dims[n++] = kCompiledHeadDims[i];
  return n;
}

cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  if (!params_are_valid(params)) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16: return run_for_element<cutlass::half_t>(params, stream);
    case DType::kBFloat16: return run_for_element<cutlass::bfloat16_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_flash
