"""The gradients' oracle and FlashAttention's bar for them, shared by the CPU and GPU backward
tests.

The oracle is jax.vjp of the dense float32 attention_reference, run on the host CPU. The bar for
low-precision gradients: each of dq, dk, dv is no further from the oracle than twice the same dense
computation in the inputs' own dtype is, plus the rounding of the oracle's answer to that dtype (an
error no implementation returning that dtype can avoid), plus `slack` times its largest entry,
plus TINY (float32 noise where the oracle's gradient is exactly 0, e.g. dq with a single key).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import attention_reference

TINY = 1e-5


def random_normal(seed: int, shape, dtype) -> jax.Array:
    """Standard-normal values, e.g. cotangents: never zeros or ones, which hide wrong terms."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale", "compute_dtype"))
def _reference_grads(q, k, v, dout, dlse, *, causal, softmax_scale, compute_dtype):
    def attention(q, k, v):
        out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       compute_dtype=compute_dtype)
        return out.astype(dout.dtype), lse

    _, vjp = jax.vjp(attention, q, k, v)
    return vjp((dout, dlse))


def reference_grads(q, k, v, dout, dlse=None, *, causal, softmax_scale=None,
                    compute_dtype=jnp.float32):
    """(dq, dk, dv) of dense attention for cotangents dout of out and dlse of lse (None: lse is not
    differentiated); with the default compute_dtype, the float32 oracle of inputs upcast to it.

    dlse must be 0 on rows that see no key: dense lse's derivative is NaN there.
    """
    cpu = jax.devices("cpu")[0]
    q, k, v, dout = (jax.device_put(x, cpu).astype(compute_dtype) for x in (q, k, v, dout))
    if dlse is None:
        batch, seqlen_q, heads, _ = q.shape
        dlse = jnp.zeros((batch, heads, seqlen_q), jnp.float32)
    return _reference_grads(q, k, v, dout, jax.device_put(dlse, cpu), causal=causal,
                            softmax_scale=softmax_scale, compute_dtype=compute_dtype)


def assert_grads_within_rule(grads, q, k, v, dout, dlse=None, *, causal, softmax_scale=None,
                             slack=0.0):
    """Holds (dq, dk, dv) of half-precision q, k, v to the bar above."""
    dtype = q.dtype
    oracle = reference_grads(q, k, v, dout, dlse, causal=causal, softmax_scale=softmax_scale)
    dense = reference_grads(q, k, v, dout, dlse, causal=causal, softmax_scale=softmax_scale,
                            compute_dtype=dtype)
    for name, grad, ref, baseline in zip(("dq", "dk", "dv"), grads, oracle, dense):
        assert grad.dtype == dtype and grad.shape == ref.shape, name
        grad, ref, baseline, rounded = (np.asarray(x, np.float32)
                                        for x in (grad, ref, baseline, ref.astype(dtype)))
        assert not np.isnan(grad).any(), f"{np.isnan(grad).sum()} NaN in {name}"
        error = np.abs(grad - ref).max()
        dense_error = np.abs(baseline - ref).max()
        rounding = np.abs(rounded - ref).max()
        bound = 2 * dense_error + rounding + slack * np.abs(ref).max() + TINY
        assert error <= bound, (
            f"max |{name} - oracle| = {error:.3e} > 2 × {dense_error:.3e} (dense attention in "
            f"{jnp.dtype(dtype).name}) + {rounding:.3e} (oracle rounded) + slack + tiny = {bound:.3e}")
