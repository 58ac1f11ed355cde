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
from jax_flash._validation import KERNEL_DTYPES, check_kernel_dtype, check_qkv

# The kernels use instructions of Ampere (sm_80) and newer.
MIN_COMPUTE_CAPABILITY = (8, 0)

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

@functools.cache
def _min_compute_capability() -> tuple[int, int] | None:
    """The oldest visible CUDA GPU's compute capability; None when lowering for CUDA without one."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None
    return min(tuple(int(part) for part in d.compute_capability.split(".")) for d in devices)


def _kernel_head_dim(head_dim: int) -> int | None:
    """The smallest compiled head dim that holds `head_dim`; inputs are zero-padded up to it."""
    return min((d for d in _extension.kernel_head_dims() if d >= head_dim), default=None)


def _why_kernel_cannot_run(head_dim: int) -> str | None:
    """Why this install and GPU cannot run the kernel for half-precision inputs; None if it can."""
    if not _extension.kernels_built():
        return _extension.why_no_kernels()
    capability = _min_compute_capability()
    if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]} and the "
                f"kernels need {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
    if _kernel_head_dim(head_dim) is None:
        return (f"head_dim {head_dim} is larger than every head dim this build compiled "
                f"{_extension.kernel_head_dims()}")
    return None


def _kernel_forward(q, k, v, *, config: FlashConfig, kernel_head_dim: int):
    """Pads head_dim with zeros to a compiled size (q·k and p·v are unchanged), calls the kernel."""
    batch, seqlen_q, heads, head_dim = q.shape
    padding = ((0, 0), (0, 0), (0, 0), (0, kernel_head_dim - head_dim))
    q, k, v = (jnp.pad(x, padding) for x in (q, k, v))
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_type = jax.ShapeDtypeStruct((batch, heads, seqlen_q), jnp.float32)
    out, lse = jax.ffi.ffi_call(_extension.FWD_TARGET, (out_type, lse_type))(
        q, k, v, softmax_scale=np.float32(config.softmax_scale), causal=bool(config.causal))
    return out[..., :head_dim], lse


def _cuda_lowering(ctx, q, k, v, *, config: FlashConfig):
    if config.implementation == "xla":
        return _lower_blockwise(ctx, q, k, v, config=config)
    q_aval = ctx.avals_in[0]
    if jnp.dtype(q_aval.dtype) not in KERNEL_DTYPES:
        if config.implementation == "cuda":
            check_kernel_dtype(q_aval.dtype)
        return _lower_blockwise(ctx, q, k, v, config=config)

    head_dim = q_aval.shape[3]
    reason = _why_kernel_cannot_run(head_dim)
    if reason is not None:
        if config.implementation == "cuda":
            raise RuntimeError(f"jax-flash: implementation='cuda' cannot run: {reason}")
        _extension.warn_fallback_once(reason)
        return _lower_blockwise(ctx, q, k, v, config=config)

    kernel = functools.partial(
        _kernel_forward, config=config, kernel_head_dim=_kernel_head_dim(head_dim))
    return mlir.lower_fun(kernel, multiple_results=True)(ctx, q, k, v)


mlir.register_lowering(flash_fwd_p, _default_lowering)
mlir.register_lowering(flash_fwd_p, _cuda_lowering, platform="cuda")


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(flash_fwd_p)
