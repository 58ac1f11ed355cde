"""The backward primitive: abstract eval, lowering and batching rule.

  operands q [b, sq, h, d], k [b, sk, h, d], v [b, sk, h, d] (one dtype), out [b, sq, h, d] and
           lse float32 [b, h, sq] (the forward's results), dout [b, sq, h, d] and dlse float32
           [b, h, sq] (their cotangents)
  results  dq, dk, dv, shaped and typed as q, k, v
  params   config: the forward's FlashConfig

On the CUDA platform it lowers to the kernel's FFI target when the kernel can run (the same
choice as the forward's, see _kernel_choice), otherwise (and on every other platform) to the
blockwise XLA backward. The FFI contract of the kernel:

  target  "jax_flash_bwd"
  operands q, k, v, dout (all float16 or all bfloat16, d one of the compiled head dims),
           lse float32 [b, h, sq], delta float32 [b, h, sq] = rowsum(dout ∘ out) − dlse
  results  dq_accum float32 [b, sq, h, d] (dq = softmax_scale · dq_accum), dk and dv [b, sk, h, d]
           in q's dtype, dq_semaphore int32 [b, h, ceil(sq / 16)] (the kernel's workspace)
  attrs    softmax_scale (f32), causal (bool), deterministic (bool)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir, xla

from jax_flash import _extension
from jax_flash._batching import register_batch_folding
from jax_flash._blockwise_bwd import blockwise_attention_bwd
from jax_flash._config import FlashConfig
from jax_flash._kernel_choice import kernel_head_dim_for, pad_head_dim
from jax_flash._validation import check_qkv

flash_bwd_p = Primitive("jax_flash_bwd")
flash_bwd_p.multiple_results = True
flash_bwd_p.def_impl(functools.partial(xla.apply_primitive, flash_bwd_p))


def _abstract_eval(q, k, v, out, lse, dout, dlse, *, config: FlashConfig):
    check_qkv(q, k, v)
    batch, seqlen_q, heads, _ = q.shape
    for name, x, shape, dtype in (("out", out, q.shape, q.dtype), ("dout", dout, q.shape, q.dtype),
                                  ("lse", lse, (batch, heads, seqlen_q), jnp.float32),
                                  ("dlse", dlse, (batch, heads, seqlen_q), jnp.float32)):
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(
                f"jax-flash: the backward expects {name} {jnp.dtype(dtype).name}{list(shape)}; "
                f"got {jnp.dtype(x.dtype).name}{list(x.shape)}")
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v))


flash_bwd_p.def_abstract_eval(_abstract_eval)


# ---- lowering --------------------------------------------------------------------------------

def _lower_blockwise(ctx, *operands, config: FlashConfig):
    backward = functools.partial(
        blockwise_attention_bwd, causal=config.causal, softmax_scale=config.softmax_scale)
    return mlir.lower_fun(backward, multiple_results=True)(ctx, *operands)


# Query rows per dq_semaphore counter (kDqSemaphoreRowsPerCounter in cuda/flash_params.h).
_DQ_SEMAPHORE_ROWS = 16


def _kernel_backward(q, k, v, out, lse, dout, dlse, *, config: FlashConfig, kernel_head_dim: int):
    """delta in XLA (one fused pass over out and dout), the kernel on zero-padded operands, then
    dq = scale · dq_accum and the padding sliced off."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    rowsum = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # [b, sq, h]
    delta = jnp.transpose(rowsum, (0, 2, 1)) - dlse
    q, k, v, dout = (pad_head_dim(x, kernel_head_dim) for x in (q, k, v, dout))
    counters = -(-seqlen_q // _DQ_SEMAPHORE_ROWS)
    result_types = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),                          # dq_accum
        jax.ShapeDtypeStruct((batch, seqlen_k, heads, kernel_head_dim), k.dtype),  # dk
        jax.ShapeDtypeStruct((batch, seqlen_k, heads, kernel_head_dim), v.dtype),  # dv
        jax.ShapeDtypeStruct((batch, heads, counters), jnp.int32),          # dq_semaphore
    )
    dq_accum, dk, dv, _ = jax.ffi.ffi_call(_extension.BWD_TARGET, result_types)(
        q, k, v, dout, lse, delta, softmax_scale=np.float32(config.softmax_scale),
        causal=bool(config.causal), deterministic=bool(config.deterministic))
    dq = (dq_accum[..., :head_dim] * np.float32(config.softmax_scale)).astype(q.dtype)
    return dq, dk[..., :head_dim], dv[..., :head_dim]


def _cuda_lowering(ctx, *operands, config: FlashConfig):
    kernel_head_dim = kernel_head_dim_for(ctx.avals_in[0], config)
    if kernel_head_dim is None:
        return _lower_blockwise(ctx, *operands, config=config)
    kernel = functools.partial(_kernel_backward, config=config, kernel_head_dim=kernel_head_dim)
    return mlir.lower_fun(kernel, multiple_results=True)(ctx, *operands)


mlir.register_lowering(flash_bwd_p, _lower_blockwise)
mlir.register_lowering(flash_bwd_p, _cuda_lowering, platform="cuda")


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(flash_bwd_p)
