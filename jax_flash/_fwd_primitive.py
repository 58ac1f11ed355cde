"""The forward primitive: abstract eval, its two lowerings and its batching rule.

On the CUDA platform it lowers to the kernel's FFI target when the kernel can run, otherwise (and
on every other platform) to the blockwise XLA implementation. The FFI contract of the kernel:

  target  "jax_flash_fwd"
  operands q [b, sq, h, d], k [b, sk, hk, d], v [b, sk, hk, d], all float16 or all bfloat16,
           d one of the compiled head dims
  results  out [b, sq, h, d] (q's dtype), lse [b, h, sq] float32
  attrs    softmax_scale (f32), causal (bool)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir, xla

from jax_flash import _extension
from jax_flash._batching import register_batch_folding
from jax_flash._blockwise import blockwise_attention
from jax_flash._config import FlashConfig
from jax_flash._kernel_choice import kernel_head_dim_for, pad_head_dim
from jax_flash._validation import check_qkv

flash_fwd_p = Primitive("jax_flash_fwd")
flash_fwd_p.multiple_results = True
flash_fwd_p.def_impl(functools.partial(xla.apply_primitive, flash_fwd_p))


def _abstract_eval(q, k, v, *, config: FlashConfig):
    check_qkv(q, k, v)
    batch, seqlen_q, heads, _ = q.shape
    out = jax.core.ShapedArray(q.shape, q.dtype)
    lse = jax.core.ShapedArray((batch, heads, seqlen_q), jnp.float32)
    return out, lse


flash_fwd_p.def_abstract_eval(_abstract_eval)


# ---- lowering: the XLA path ------------------------------------------------------------------

def _lower_blockwise(ctx, q, k, v, *, config: FlashConfig):
    attention = functools.partial(
        blockwise_attention, causal=config.causal, softmax_scale=config.softmax_scale)
    return mlir.lower_fun(attention, multiple_results=True)(ctx, q, k, v)


def _default_lowering(ctx, q, k, v, *, config: FlashConfig):
    """Every platform but CUDA."""
    if config.implementation == "cuda":
        platforms = ", ".join(ctx.module_context.platforms)
        raise RuntimeError(
            "jax-flash: implementation='cuda' runs only on CUDA GPUs, but this computation is "
            f"lowered for {platforms}; use implementation=None or 'xla'")
    return _lower_blockwise(ctx, q, k, v, config=config)


# ---- lowering: the CUDA kernel ---------------------------------------------------------------

def _kernel_forward(q, k, v, *, config: FlashConfig, kernel_head_dim: int):
    """Pads head_dim with zeros to a compiled size, calls the kernel, slices the padding off."""
    batch, seqlen_q, heads, head_dim = q.shape
    q, k, v = (pad_head_dim(x, kernel_head_dim) for x in (q, k, v))
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_type = jax.ShapeDtypeStruct((batch, heads, seqlen_q), jnp.float32)
    out, lse = jax.ffi.ffi_call(_extension.FWD_TARGET, (out_type, lse_type))(
        q, k, v, softmax_scale=np.float32(config.softmax_scale), causal=bool(config.causal))
    return out[..., :head_dim], lse


def _cuda_lowering(ctx, q, k, v, *, config: FlashConfig):
    kernel_head_dim = kernel_head_dim_for(ctx.avals_in[0], config)
    if kernel_head_dim is None:
        return _lower_blockwise(ctx, q, k, v, config=config)
    kernel = functools.partial(_kernel_forward, config=config, kernel_head_dim=kernel_head_dim)
    return mlir.lower_fun(kernel, multiple_results=True)(ctx, q, k, v)


mlir.register_lowering(flash_fwd_p, _default_lowering)
mlir.register_lowering(flash_fwd_p, _cuda_lowering, platform="cuda")


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(flash_fwd_p)
