"""The backward primitive: abstract eval, lowering and batching rule.

  operands q [b, sq, h, d], k [b, sk, hk, d], v [b, sk, hk, d] (one dtype, hk divides h),
           out [b, sq, h, d] and lse float32 [b, h, sq] (the forward's results), dout
           [b, sq, h, d] and dlse float32 [b, h, sq] (their cotangents), then the forward's
           feature operands in its order (alibi_slopes, mask, bias, segment ids, positions,
           dropout_seed; see _fwd_primitive), each only when the config uses it
  results  dq, dk, dv, shaped and typed as q, k, v; then dbias (shaped and typed as bias) when
           there is a bias and config.bias_grad, and dalibi_slopes float32 [b, h] when there
           are slopes
  params   config: the forward's FlashConfig (its bias_grad turned off by the DCE rule below
           when dbias goes unused)

On the CUDA platform it lowers to the kernel's FFI target when the kernel can run (the same
choice as the forward's, see _kernel_choice), otherwise (and on every other platform) to the
blockwise XLA backward. The FFI contract of the kernel:

  target  "jax_flash_bwd"
  operands q, k, v, dout (all float16 or all bfloat16, d one of the compiled head dims),
           lse float32 [b, h, sq], delta float32 [b, h, sq] = rowsum(dout ∘ out) − dlse; then
           alibi_slopes float32 [b, h] when alibi, the mask's bits and the bias when mask and
           bias (as the forward's), dropout_seed uint32 [b, 2] when dropout_threshold > 0, then
           the packed-sequence ranges when any
  results  dq [b, sq, h, d], dk and dv [b, sk, h, d], all in q's dtype, dk and dv one per query
           head (XLA sums each group of hk's to [b, sk, hk, d]); the kernel's workspaces
           dq_accum float32 [b, h, sq rounded up to a multiple of 128, d] and
           dq_semaphore int32 [b, h, ceil(sq / 16)]; dalibi_partial float32
           [b, h, ceil(sk / 64)] when alibi, else [b, h, 0], which XLA sums to dalibi_slopes;
           dbias float32 in the bias's shape when bias and config.bias_grad, else [0]
  attrs    softmax_scale (f32), softcap (f32, 0: off), alibi, mask, bias, causal (bool),
           window_left and window_right (i32, -1: unbounded), deterministic (bool), dropout_threshold (i32,
           as the forward's)
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax._src.interpreters import partial_eval as pe
from jax.interpreters import mlir, xla

from jax_flash import _extension
from jax_flash._batching import batch_broadcast_operands, register_batch_folding
from jax_flash._blockwise import options_of
from jax_flash._blockwise_bwd import blockwise_attention_bwd
from jax_flash._config import FlashConfig
from jax_flash._kernel_choice import kernel_head_dim_for, kernel_feature_arguments, pad_head_dim
from jax_flash._sharding import lower_partitioned, needs_devices_when_lowering, result_aval
from jax_flash._validation import check_extra_operands, check_qkv

flash_bwd_p = Primitive("jax_flash_bwd")
flash_bwd_p.multiple_results = True
flash_bwd_p.def_impl(functools.partial(xla.apply_primitive, flash_bwd_p))


def _abstract_eval(q, k, v, out, lse, dout, dlse, *extras, config: FlashConfig):
    check_qkv(q, k, v)
    check_extra_operands(q, k, config.extra_operand_names(), extras)
    batch, seqlen_q, heads, _ = q.shape
    for name, x, shape, dtype in (("out", out, q.shape, q.dtype), ("dout", dout, q.shape, q.dtype),
                                  ("lse", lse, (batch, heads, seqlen_q), jnp.float32),
                                  ("dlse", dlse, (batch, heads, seqlen_q), jnp.float32)):
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(
                f"jax-flash: the backward expects {name} {jnp.dtype(dtype).name}{list(shape)}; "
                f"got {jnp.dtype(x.dtype).name}{list(x.shape)}")
    named = dict(zip(config.extra_operand_names(), extras))
    bias_grad = config.has_bias and config.bias_grad
    grads = [q, k, v]
    if bias_grad:
        grads.append(named["bias"])
    if config.has_alibi_slopes:
        grads.append(named["alibi_slopes"])
    operand_names = ("q", "k", "v", *("bias",) * bias_grad,
                     *("alibi_slopes",) * config.has_alibi_slopes)
    return tuple(result_aval(x, name, grad_name, x.dtype)
                 for x, name, grad_name in zip(grads, operand_names, _grad_names(config)))


def _grad_names(config: FlashConfig) -> tuple[str, ...]:
    """The results, in order."""
    return ("dq", "dk", "dv") + ("dbias",) * (config.has_bias and config.bias_grad) + (
        ("dalibi_slopes",) * config.has_alibi_slopes)


flash_bwd_p.def_abstract_eval(_abstract_eval)


def _dce_rule(used_outputs: list[bool], eqn):
    """Drops an unused dbias (a bias that is not differentiated): the backward then neither
    computes nor writes it. Every operand stays used."""
    config = eqn.params["config"]
    if not any(used_outputs) and not pe.has_effects(eqn):
        return [False] * len(eqn.invars), None
    dbias = 3  # the result after dq, dk, dv
    if not (config.has_bias and config.bias_grad) or used_outputs[dbias]:
        return [True] * len(eqn.invars), eqn
    params = dict(eqn.params, config=dataclasses.replace(config, bias_grad=False))
    outvars = eqn.outvars[:dbias] + eqn.outvars[dbias + 1:]
    return [True] * len(eqn.invars), pe.new_jaxpr_eqn(
        eqn.invars, outvars, eqn.primitive, params, eqn.effects, eqn.source_info, eqn.ctx)


pe.dce_rules[flash_bwd_p] = _dce_rule


# ---- lowering --------------------------------------------------------------------------------

def _lower_blockwise(ctx, *operands, config: FlashConfig):
    backward = functools.partial(blockwise_attention_bwd, **options_of(config))
    return _lower_sharded(ctx, backward, operands, config)


def _lower_sharded(ctx, local_fn, operands, config: FlashConfig):
    """local_fn runs on each device's shard of a sharded computation (see _sharding)."""
    names = ("q", "k", "v", "out", "lse", "dout", "dlse", *config.extra_operand_names())
    return lower_partitioned(ctx, local_fn, operands, operand_names=names,
                             result_names=_grad_names(config), config=config)


# Query rows per dq_semaphore counter and the multiple dq_accum's rows are rounded up to
# (kDqSemaphoreRowsPerCounter and kDqAccumRowsMultiple in cuda/flash_params.h).
_DQ_SEMAPHORE_ROWS = 16
_DQ_ACCUM_ROWS_MULTIPLE = 128
# Keys per dalibi_partial entry (kAlibiPartialKeys).
_ALIBI_PARTIAL_KEYS = 64


def _kernel_backward(q, k, v, out, lse, dout, dlse, *extras, config: FlashConfig,
                     kernel_head_dim: int):
    """delta in XLA (one fused pass over out and dout), the kernel on zero-padded operands, then
    dk and dv summed over each group of query heads and the padding sliced off; dbias (with a
    bias) cast to the bias's dtype; dalibi_slopes (with ALiBi) the sum of the kernel's
    per-key-tile partials."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    rowsum = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # [b, sq, h]
    delta = jnp.transpose(rowsum, (0, 2, 1)) - dlse
    q, k, v, dout = (pad_head_dim(x, kernel_head_dim) for x in (q, k, v, dout))
    counters = -(-seqlen_q // _DQ_SEMAPHORE_ROWS)
    accum_rows = -(-seqlen_q // _DQ_ACCUM_ROWS_MULTIPLE) * _DQ_ACCUM_ROWS_MULTIPLE
    alibi_partials = -(-seqlen_k // _ALIBI_PARTIAL_KEYS) if config.has_alibi_slopes else 0
    bias = dict(zip(config.extra_operand_names(), extras)).get("bias")
    bias_grad = bias is not None and config.bias_grad
    result_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),                             # dq
        jax.ShapeDtypeStruct((batch, seqlen_k, heads, kernel_head_dim), k.dtype),  # dk
        jax.ShapeDtypeStruct((batch, seqlen_k, heads, kernel_head_dim), v.dtype),  # dv
        jax.ShapeDtypeStruct((batch, heads, accum_rows, kernel_head_dim), jnp.float32),  # dq_accum
        jax.ShapeDtypeStruct((batch, heads, counters), jnp.int32),          # dq_semaphore
        jax.ShapeDtypeStruct((batch, heads, alibi_partials), jnp.float32),  # dalibi_partial
        jax.ShapeDtypeStruct(bias.shape if bias_grad else (0,), jnp.float32),  # dbias
    )
    attributes, operands = kernel_feature_arguments(config, extras, k.shape[1], backward=True)
    call = jax.ffi.ffi_call(_extension.BWD_TARGET, result_types)
    dq, dk, dv, _, _, dalibi_partial, dbias = call(
        q, k, v, dout, lse, delta, *operands,
        softmax_scale=np.float32(config.softmax_scale), softcap=np.float32(config.softcap),
        deterministic=bool(config.deterministic), **attributes)
    dq = dq[..., :head_dim]
    grads = [dq, *(_sum_groups(x[..., :head_dim], kv_heads) for x in (dk, dv))]
    if bias_grad:
        grads.append(dbias.astype(bias.dtype))
    if config.has_alibi_slopes:
        grads.append(jnp.sum(dalibi_partial, axis=-1))
    return tuple(grads)


def _sum_groups(x, kv_heads: int):
    """[b, sk, h, d] per query head -> [b, sk, kv_heads, d], summed over each kv head's group
    (query heads kv_head · group ... kv_head · group + group − 1) in float32."""
    batch, seqlen_k, heads, head_dim = x.shape
    if heads == kv_heads:
        return x
    grouped = x.reshape(batch, seqlen_k, kv_heads, heads // kv_heads, head_dim)
    return jnp.sum(grouped.astype(jnp.float32), axis=3).astype(x.dtype)


def _broadcast_bias(avals_in, config: FlashConfig) -> bool:
    """Whether the bias (if any) has a dimension of size 1 that broadcasts."""
    if not config.has_bias:
        return False
    q, k = avals_in[:2]
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    bias = avals_in[7 + config.extra_operand_names().index("bias")]
    return any(size == 1 < whole for size, whole in zip(bias.shape, full))


def _cuda_lowering(ctx, *operands, config: FlashConfig):
    kernel_head_dim = kernel_head_dim_for(ctx.avals_in[0], config, backward=True,
                                          broadcast_bias=_broadcast_bias(ctx.avals_in, config))
    if kernel_head_dim is None:
        return _lower_blockwise(ctx, *operands, config=config)
    kernel = functools.partial(_kernel_backward, config=config, kernel_head_dim=kernel_head_dim)
    return _lower_sharded(ctx, kernel, operands, config)


mlir.register_lowering(flash_bwd_p, _lower_blockwise)
mlir.register_lowering(flash_bwd_p, _cuda_lowering, platform="cuda")
needs_devices_when_lowering(flash_bwd_p)


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(
    flash_bwd_p, lambda params: batch_broadcast_operands(
        params["config"], 7, bias_grad_result=3 if params["config"].bias_grad else None))
