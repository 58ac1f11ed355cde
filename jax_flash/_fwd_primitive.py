"""The forward primitive: abstract eval, its two lowerings and its batching rule.

On the CUDA platform it lowers to the kernel's FFI target when the kernel can run, otherwise (and
on every other platform) to the blockwise XLA implementation. The FFI contract of the kernel:

  target  "jax_flash_fwd"
  operands q [b, sq, h, d], k [b, sk, hk, d], v [b, sk, hk, d] (hk divides h), all float16 or
           all bfloat16, d one of the compiled head dims; then alibi_slopes float32 [b, h] when
           alibi, mask bits uint32 [b | 1, h | 1, sq | 1, ceil(sk / 128) · 4] when mask (see
           _kernel_choice.pack_mask_bits), bias (float32, float16 or bfloat16, each dimension 1
           or that of [b, h, sq, sk]) when bias, dropout_seed uint32 [b, 2] when
           dropout_threshold > 0, then the packed-sequence ranges when any
  results  out [b, sq, h, d] (q's dtype), lse [b, h, sq] float32
  attrs    softmax_scale (f32), softcap (f32, 0: off), alibi, mask, bias (bool), causal (bool),
           window_left and window_right (i32, -1: unbounded), dropout_threshold (i32, the rate
           in units of 1/256, 0: off)

The primitive's operands are q, k, v followed by the feature operands its config uses, in this
fixed order (FlashConfig.extra_operand_names): alibi_slopes float32 [b, h], mask bool and bias
float, each 4-D broadcastable to [b, h, sq, sk], q_segment_ids and q_positions int32 [b, sq],
kv_segment_ids and kv_positions int32 [b, sk], dropout_seed uint32 [b, 2]. The kernel runs
window_size, softcap, ALiBi, mask, bias, dropout, segment ids and positions (as per-token
ranges, see _kernel_choice).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir, xla

from jax_flash import _extension
from jax_flash._batching import batch_broadcast_operands, register_batch_folding
from jax_flash._blockwise import blockwise_attention, options_of
from jax_flash._config import FlashConfig
from jax_flash._kernel_choice import kernel_head_dim_for, kernel_feature_arguments, pad_head_dim
from jax_flash._sharding import lower_partitioned, needs_devices_when_lowering, result_aval
from jax_flash._validation import check_extra_operands, check_qkv

flash_fwd_p = Primitive("jax_flash_fwd")
flash_fwd_p.multiple_results = True
flash_fwd_p.def_impl(functools.partial(xla.apply_primitive, flash_fwd_p))


def _abstract_eval(q, k, v, *extras, config: FlashConfig):
    check_qkv(q, k, v)
    check_extra_operands(q, k, config.extra_operand_names(), extras)
    out = result_aval(q, "q", "out", q.dtype)
    lse = result_aval(q, "q", "lse", jnp.float32)
    return out, lse


flash_fwd_p.def_abstract_eval(_abstract_eval)


# ---- lowering: the XLA path ------------------------------------------------------------------

def _lower_blockwise(ctx, *operands, config: FlashConfig):
    attention = functools.partial(blockwise_attention, **options_of(config))
    return _lower_sharded(ctx, attention, operands, config)


def _default_lowering(ctx, *operands, config: FlashConfig):
    """Every platform but CUDA."""
    if config.implementation == "cuda":
        platforms = ", ".join(ctx.module_context.platforms)
        raise RuntimeError(
            "jax-flash: implementation='cuda' runs only on CUDA GPUs, but this computation is "
            f"lowered for {platforms}; use implementation=None or 'xla'")
    return _lower_blockwise(ctx, *operands, config=config)


# ---- lowering: the CUDA kernel ---------------------------------------------------------------

def _kernel_forward(q, k, v, *extras, config: FlashConfig, kernel_head_dim: int):
    """Pads head_dim with zeros to a compiled size, calls the kernel, slices the padding off."""
    batch, seqlen_q, heads, head_dim = q.shape
    q, k, v = (pad_head_dim(x, kernel_head_dim) for x in (q, k, v))
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_type = jax.ShapeDtypeStruct((batch, heads, seqlen_q), jnp.float32)
    attributes, operands = kernel_feature_arguments(config, extras, k.shape[1], backward=False)
    out, lse = jax.ffi.ffi_call(_extension.FWD_TARGET, (out_type, lse_type))(
        q, k, v, *operands, softmax_scale=np.float32(config.softmax_scale),
        softcap=np.float32(config.softcap), **attributes)
    return out[..., :head_dim], lse


def _cuda_lowering(ctx, *operands, config: FlashConfig):
    kernel_head_dim = kernel_head_dim_for(ctx.avals_in[0], config)
    if kernel_head_dim is None:
        return _lower_blockwise(ctx, *operands, config=config)
    kernel = functools.partial(_kernel_forward, config=config, kernel_head_dim=kernel_head_dim)
    return _lower_sharded(ctx, kernel, operands, config)


def _lower_sharded(ctx, local_fn, operands, config: FlashConfig):
    """local_fn runs on each device's shard of a sharded computation (see _sharding)."""
    return lower_partitioned(ctx, local_fn, operands,
                             operand_names=("q", "k", "v", *config.extra_operand_names()),
                             result_names=("out", "lse"), config=config)


mlir.register_lowering(flash_fwd_p, _default_lowering)
mlir.register_lowering(flash_fwd_p, _cuda_lowering, platform="cuda")
needs_devices_when_lowering(flash_fwd_p)


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(flash_fwd_p, lambda params: batch_broadcast_operands(params["config"], 3))
