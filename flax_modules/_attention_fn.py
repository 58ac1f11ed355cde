"""flash_attention_fn: jax_flash.flash_attention behind the attention_fn interface of Flax's
linen.MultiHeadDotProductAttention and nnx.MultiHeadAttention."""

import math

import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash.flax_modules._masks import as_bool_mask, check_broadcasts, recognize_mask, to_4d


def flash_attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                       dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                       precision=None, module=None, force_fp32_for_softmax=False,
                       qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                       is_causal=False, *, causal=False, window_size=None, softcap=None,
                       softmax_scale=None, implementation=None, q_segment_ids=None,
                       kv_segment_ids=None):
    """Flax-compatible attention computed by jax_flash.flash_attention.

    Use it as `nn.MultiHeadDotProductAttention(..., attention_fn=flash_attention_fn)` (linen) or
    `nnx.MultiHeadAttention(..., attention_fn=flash_attention_fn)` (nnx); the keyword-only extras
    go through functools.partial, e.g. `partial(flash_attention_fn, causal=True)`.

    Args:
      query: [batch..., seqlen_q, heads, head_dim]; any number of batch dims, including none.
      key, value: [batch..., seqlen_k, kv_heads, head_dim]; kv_heads divides heads (GQA/MQA).
      bias: additive, broadcastable to [batch..., heads, seqlen_q, seqlen_k].
      mask: broadcastable to [batch..., heads, seqlen_q, seqlen_k]; True (or nonzero) keeps a
        score. A concrete mask (numpy, or a jax array made outside the jitted function) that
        allows everything is dropped, and one that is exactly the causal pattern becomes
        causal=True. A mask computed inside jax.jit is traced and always takes the general mask
        path, which reads it tile by tile (the forward kernel runs it; its backward takes the
        pure-JAX path for now): pass causal=True (or nnx's is_causal=True) instead of a causal
        mask for full speed under jit. A query whose mask hides every key gets output 0 (Flax's own
        attention averages all values there).
      broadcast_dropout: accepted for Flax compatibility; jax-flash draws the dropout mask
        independently for every batch element and head whatever it says.
      dropout_rng, dropout_rate, deterministic: dropout on the attention probabilities runs when
        dropout_rate > 0 and not deterministic; it then needs dropout_rng. jax-flash's dropout
        mask differs from Flax's for the same key.
      dtype: computation dtype; None promotes query, key and value to their common dtype.
      precision: accepted for Flax compatibility; scores and the weighted sum accumulate in
        float32 whatever it says.
      module: Flax passes the module to sow the attention weights (sow_weights=True); flash
        attention never forms those weights, so a module raises ValueError.
      force_fp32_for_softmax: accepted; the softmax is always computed in float32.
      qk_attn_weights_einsum, attn_weights_value_einsum: custom einsums (quantization) cannot
        run inside the fused kernel; anything but None raises ValueError.
      is_causal: nnx's flag: query i sees key j iff j <= i (aligned to the top left, as
        jax.nn.dot_product_attention). Equal to causal=True when seqlen_q == seqlen_k.
      causal: jax-flash's causal mask, aligned to the bottom right: j <= i + seqlen_k - seqlen_q.
      window_size, softcap, softmax_scale, implementation: as in jax_flash.flash_attention.
      q_segment_ids: integer [batch..., seqlen_q], packed sequences: a query sees only keys with
        its own id, and a negative id is padding (its output is 0). As in
        jax_flash.flash_attention, which reads them a tile at a time (no dense mask is built).
      kv_segment_ids: integer [batch..., seqlen_k]; defaults to q_segment_ids when seqlen_q ==
        seqlen_k.

    Returns:
      [batch..., seqlen_q, heads, head_dim] in the computation dtype.
    """
    if module is not None:
        raise ValueError(
            "jax-flash: flash attention never forms the attention weights, so it cannot sow "
            "them; call the module with sow_weights=False")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
        raise ValueError(
            "jax-flash: qk_attn_weights_einsum / attn_weights_value_einsum cannot run inside the "
            "fused attention; leave them unset with flash_attention_fn")
    del broadcast_dropout, precision, force_fp32_for_softmax  # documented above

    query, key, value = _promote(query, key, value, dtype)
    batch_shape = tuple(query.shape[:-3])
    seqlen_q, heads = query.shape[-3:-1]
    seqlen_k = key.shape[-3]
    q, k, v = (x.reshape((math.prod(batch_shape), *x.shape[-3:])) for x in (query, key, value))

    options = {}
    if mask is not None:
        check_broadcasts("mask", mask, batch_shape, heads, seqlen_q, seqlen_k)
    if is_causal:
        if seqlen_q == seqlen_k:
            causal = True
        else:  # numpy, so that without a mask of the user's it stays concrete under jit
            top_left = np.tril(np.ones((seqlen_q, seqlen_k), np.bool_))
            mask = top_left if mask is None else jnp.logical_and(as_bool_mask(mask), top_left)
    if mask is not None:
        # read before any jnp op: under jit those would turn a constant mask into a tracer
        mask, mask_is_causal = recognize_mask(mask, seqlen_q, seqlen_k)
        causal = causal or mask_is_causal
    if mask is not None:
        options["mask"] = to_4d(as_bool_mask(mask), batch_shape)
    if bias is not None:
        bias = jnp.asarray(bias)
        check_broadcasts("bias", bias, batch_shape, heads, seqlen_q, seqlen_k)
        options["bias"] = to_4d(bias, batch_shape)
    if window_size is not None:
        options["window_size"] = window_size
    if softcap is not None:
        options["softcap"] = softcap
    for name, ids, seqlen in (("q_segment_ids", q_segment_ids, seqlen_q),
                              ("kv_segment_ids", kv_segment_ids, seqlen_k)):
        if ids is not None:
            options[name] = _flatten_segment_ids(name, ids, batch_shape, seqlen)
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError(
                f"jax-flash: dropout_rate={dropout_rate} with deterministic=False needs a "
                "dropout_rng")
        options.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    out = jax_flash.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                    implementation=implementation, **options)
    return out.reshape((*batch_shape, *out.shape[1:]))


def _flatten_segment_ids(name, ids, batch_shape, seqlen):
    """[batch..., seqlen] ids as the [batch, seqlen] that jax_flash.flash_attention takes."""
    ids = jnp.asarray(ids)
    if ids.shape != (*batch_shape, seqlen):
        raise ValueError(
            f"jax-flash: {name} must be [batch..., seqlen] = {(*batch_shape, seqlen)}; got "
            f"shape {ids.shape}")
    return ids.reshape((math.prod(batch_shape), seqlen))


def _promote(query, key, value, dtype):
    if query.ndim < 3 or not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            "jax-flash: query, key and value must all be [batch..., seqlen, heads, head_dim] "
            f"with the same rank; got query {query.shape}, key {key.shape}, value {value.shape}")
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            "jax-flash: query, key and value must have the same batch dims; got query "
            f"{query.shape}, key {key.shape}, value {value.shape}")
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    return (jnp.asarray(x, dtype) for x in (query, key, value))
