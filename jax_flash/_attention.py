"""flash_attention: checks its inputs, resolves defaults, binds the forward primitive, and gives
it a custom VJP that binds the backward primitive."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters import ad

from jax_flash._bwd_primitive import flash_bwd_p
from jax_flash._config import FlashConfig
from jax_flash._fwd_primitive import flash_fwd_p
from jax_flash._validation import (
    check_flag,
    check_implementation,
    check_kernel_dtype,
    check_qkv,
    check_softmax_scale,
)


# The names of what the forward pass keeps for the backward, in the order (q, k, v, out, lse).
# jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)) keeps
# exactly these and recomputes the rest of f; leaving "flash_attention_out" and
# "flash_attention_lse" out reruns the attention forward in the backward pass instead.
RESIDUAL_NAMES = ("flash_attention_q", "flash_attention_k", "flash_attention_v",
                  "flash_attention_out", "flash_attention_lse")


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False,
                    implementation=None, deterministic=False):
    """Scaled dot-product attention, softmax(q k^T * softmax_scale) v, without the score matrix.

    Args:
      q: [batch, seqlen_q, heads, head_dim] queries.
      k: [batch, seqlen_k, heads, head_dim] keys.
      v: [batch, seqlen_k, heads, head_dim] values. q, k and v share one dtype: float16, bfloat16,
        float32 (or float64 with x64 enabled); head_dim is at most 256.
      causal: query i sees key j iff j <= i + seqlen_k - seqlen_q (aligned to the bottom right, as
        FlashAttention 2.1 and later). A query that sees no key (seqlen_q > seqlen_k) gets out = 0
        and lse = -inf, the log of an empty sum.
      softmax_scale: multiplies the scores; default 1 / sqrt(head_dim).
      return_lse: also return lse, the log-sum-exp of each row of scaled scores.
      implementation: None picks the CUDA kernel where it can run (a CUDA GPU of compute capability
        8.0 or newer, an install built with the kernels, float16 or bfloat16 inputs) and the XLA
        path otherwise; "cuda" insists on the kernel and raises where it cannot run; "xla" takes
        the pure-JAX blockwise path on every platform. It chooses the forward pass; the
        backward pass is the pure-JAX one everywhere for now.
      deterministic: make the backward pass bitwise reproducible from run to run. Today's
        pure-JAX backward always is; the flag is for the CUDA backward kernel to come, whose
        default reduces dq with atomics (faster, not bitwise reproducible).

    Returns:
      out [batch, seqlen_q, heads, head_dim] in q's dtype, or (out, lse) with lse float32
      [batch, heads, seqlen_q] when return_lse is set.

    Reverse mode (jax.grad, jax.vjp) works, with respect to q, k and v and through out and lse
    alike, in O(seqlen) memory: the backward recomputes the scores a tile at a time from the
    residuals named in RESIDUAL_NAMES. Forward mode (jax.jvp, jax.jacfwd) raises JAX's TypeError
    for functions with a custom VJP, and derivatives of the gradient (jax.hessian, grad of grad)
    raise NotImplementedError.
    """
    q, k, v = (_as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    check_qkv(q, k, v)
    check_implementation(implementation)
    if implementation == "cuda":
        check_kernel_dtype(q.dtype)
    scale = check_softmax_scale(softmax_scale)
    return_lse = check_flag("return_lse", return_lse)
    config = FlashConfig(
        causal=check_flag("causal", causal),
        softmax_scale=1.0 / math.sqrt(q.shape[3]) if scale is None else scale,
        implementation=implementation,
        deterministic=check_flag("deterministic", deterministic),
    )
    out, lse = _attention(q, k, v, config)
    return (out, lse) if return_lse else out


def _as_array(name: str, x):
    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"jax-flash: {name} must be an array; got {type(x).__name__}")
    return x


# ---- differentiation -------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, config: FlashConfig):
    return tuple(flash_fwd_p.bind(q, k, v, config=config))


def _attention_fwd(q, k, v, config: FlashConfig):
    out, lse = flash_fwd_p.bind(q, k, v, config=config)
    residuals = tuple(checkpoint_name(x, name) for x, name in zip((q, k, v, out, lse),
                                                                  RESIDUAL_NAMES))
    return (out, lse), residuals


def _attention_bwd(config: FlashConfig, residuals, cotangents):
    dout, dlse = cotangents  # dlse is zeros where lse is not differentiated
    return tuple(flash_bwd_p.bind(*residuals, dout, dlse, config=config))


_attention.defvjp(_attention_fwd, _attention_bwd)


# First derivatives go through the custom VJP and never differentiate a primitive; a derivative
# of the gradient does: the outer one meets jax_flash_fwd (in the inner VJP's forward) and
# jax_flash_bwd. Both refuse by name rather than with JAX's generic "rule not implemented".
def _refuse_higher_order(primals, tangents, **params):
    raise NotImplementedError(
        "jax-flash: higher-order derivatives of flash_attention are not supported (grad of grad, "
        "jax.hessian); differentiate it once, in reverse mode")


ad.primitive_jvps[flash_fwd_p] = _refuse_higher_order
ad.primitive_jvps[flash_bwd_p] = _refuse_higher_order
