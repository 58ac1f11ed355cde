"""Dense attention that materializes every score: the oracle of the tests and the benchmark."""

import math

import jax
import jax.numpy as jnp


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, compute_dtype=jnp.float32):
    """Attention over [batch, seqlen, heads, head_dim] inputs, computed densely in `compute_dtype`.

    With the default float32 this is the oracle: inputs are upcast, matrix products run at full
    precision, and out [b, sq, h, d] and lse [b, h, sq] come back in float32. Passing the inputs'
    own low precision instead gives the baseline of the test rule "no worse than twice the error
    of the same computation in the same dtype".

    Semantics match flash_attention: with `causal`, query i sees key j iff j <= i + sk - sq; a
    query that sees no key gets out = 0 and lse = -inf (the log of an empty sum).
    """
    seqlen_q, seqlen_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    q, k, v = (x.astype(compute_dtype) for x in (q, k, v))

    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    scores = scores * jnp.asarray(softmax_scale, compute_dtype)
    if causal:
        query = jnp.arange(seqlen_q)[:, None]
        key = jnp.arange(seqlen_k)[None, :]
        scores = jnp.where(key <= query + seqlen_k - seqlen_q, scores, -jnp.inf)

    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # Rows with no visible key have row_max = -inf; shifting them by 0 keeps exp() at 0, not NaN.
    row_max = jnp.where(jnp.isneginf(row_max), 0, row_max)
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    lse = (row_max + jnp.log(row_sum))[..., 0]
    probs = probs / jnp.where(row_sum == 0, 1, row_sum)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out, lse.astype(jnp.float32)
