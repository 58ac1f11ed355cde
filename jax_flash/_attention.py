"""flash_attention: checks its inputs, resolves defaults, and binds the forward primitive."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._config import FlashConfig
from jax_flash._fwd_primitive import flash_fwd_p
from jax_flash._validation import (
    check_flag,
    check_implementation,
    check_kernel_dtype,
    check_qkv,
    check_softmax_scale,
)


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False,
                    implementation=None):
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
        the pure-JAX blockwise path on every platform.

    Returns:
      out [batch, seqlen_q, heads, head_dim] in q's dtype, or (out, lse) with lse float32
      [batch, heads, seqlen_q] when return_lse is set.

    Differentiation is not implemented yet: jax.grad raises NotImplementedError, and forward mode
    (jax.jvp, jax.jacfwd) raises JAX's TypeError for functions with a custom VJP.
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
# The backward kernel slots in here: _attention_fwd already keeps what it will need.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, config: FlashConfig):
    return tuple(flash_fwd_p.bind(q, k, v, config=config))


def _attention_fwd(q, k, v, config: FlashConfig):
    out, lse = flash_fwd_p.bind(q, k, v, config=config)
    return (out, lse), (q, k, v, out, lse)


def _attention_bwd(config: FlashConfig, residuals, cotangents):
    raise NotImplementedError(
        "jax-flash: gradients of flash_attention are not implemented yet (the backward kernel "
        "comes in a later release); use jax.nn.dot_product_attention where you need gradients")


_attention.defvjp(_attention_fwd, _attention_bwd)
