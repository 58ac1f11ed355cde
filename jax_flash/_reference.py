"""Dense attention that materializes every score: the oracle of the tests and the benchmark."""

import math

import jax
import jax.numpy as jnp


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, compute_dtype=jnp.float32,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, mask=None,
                        bias=None, sinks=None, dropout_rate=0.0, dropout_keep=None,
                        q_segment_ids=None, kv_segment_ids=None):
    """Attention over [batch, seqlen, heads, head_dim] inputs, computed densely in `compute_dtype`.

    With the default float32 this is the oracle: inputs are upcast, matrix products run at full
    precision, and out [b, sq, h, d] and lse [b, h, sq] come back in float32. Passing the inputs'
    own low precision instead gives the baseline of the test rule "no worse than twice the error
    of the same computation in the same dtype".

    Semantics match flash_attention: k and v may have fewer heads than q (query head i uses kv
    head i // (heads_q / heads_kv)); with `causal`, query i sees key j iff j <= i + sk - sq;
    window_size (left, right) keeps i + sk - sq - left <= j <= i + sk - sq + right (-1:
    unbounded); the scaled scores s become softcap·tanh(s / softcap), then get
    −alibi_slopes·|i + sk − sq − j| and bias added; mask (True: attend) and bias broadcast to
    [b, h, sq, sk]; sinks [h] join each row's softmax denominator with no value. A query that sees
    no key gets out = 0 and lse = -inf (the log of an empty sum; with sinks, lse = the sink).
    Dropout keeps the probabilities where dropout_keep [b, h, sq, sk] is True and scales them by
    1 / (1 - dropout_rate); lse is that of the probabilities before dropout. With segment ids
    q_segment_ids [b, sq] and kv_segment_ids [b, sk] (default: q's), query i sees key j only when
    their ids are equal and not negative (negative: padding).
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    # Grouped-query attention: the dense oracle may simply repeat each kv head for its group.
    k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))

    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    scores = scores * jnp.asarray(softmax_scale, compute_dtype)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    diagonal = jnp.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q  # the key aligned with query i
    key = jnp.arange(seqlen_k)[None, :]
    if alibi_slopes is not None:
        slopes = jnp.broadcast_to(alibi_slopes, (batch, heads)).astype(compute_dtype)
        scores = scores - slopes[:, :, None, None] * jnp.abs(diagonal - key).astype(compute_dtype)
    if bias is not None:
        scores = scores + bias.astype(compute_dtype)
    visible = jnp.ones((seqlen_q, seqlen_k), bool)
    left, right = window_size
    if causal:
        visible &= key <= diagonal
    if right != -1:
        visible &= key <= diagonal + right
    if left != -1:
        visible &= key >= diagonal - left
    if mask is not None:
        visible = visible & mask
    if q_segment_ids is not None:
        kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        visible = visible & (same & (q_segment_ids >= 0)[:, :, None])[:, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    if sinks is not None:
        sink_column = jnp.broadcast_to(sinks.astype(compute_dtype)[None, :, None, None],
                                       (batch, heads, seqlen_q, 1))
        scores = jnp.concatenate([scores, sink_column], axis=-1)

    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # Rows with no visible key have row_max = -inf; shifting them by 0 keeps exp() at 0, not NaN.
    row_max = jnp.where(jnp.isneginf(row_max), 0, row_max)
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    lse = (row_max + jnp.log(row_sum))[..., 0]
    probs = probs / jnp.where(row_sum == 0, 1, row_sum)
    if sinks is not None:
        probs = probs[..., :seqlen_k]  # the sink takes its share and gives no value
    if dropout_keep is not None:
        probs = jnp.where(dropout_keep, probs / (1 - dropout_rate), 0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out, lse.astype(jnp.float32)
