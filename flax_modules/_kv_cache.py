"""The key/value cache of autoregressive decoding, shared by the linen and nnx modules.

The cache holds keys and values [batch, max_length, kv_heads, head_dim] and the number of valid
positions of each sequence, cache_lengths [batch] int32. A call appends a chunk of tokens to every
sequence at that sequence's own length, and its queries attend to the valid prefix up to their
own position.
"""

import jax.numpy as jnp

from jax_flash.flax_modules._masks import as_bool_mask, check_broadcasts


def check_chunk(cached_key, query, key, value):
    """The new keys and values must match the cache in batch, heads and head_dim, and the query
    chunk in length (decoding is self-attention: query t sits at key t's position)."""
    batch, max_length, kv_heads, head_dim = cached_key.shape
    for name, x in (("key", key), ("value", value)):
        if x.ndim != 4 or (x.shape[0], *x.shape[2:]) != (batch, kv_heads, head_dim):
            raise ValueError(
                f"jax-flash: decoding appends {name} [batch, chunk, kv_heads, head_dim] to a cache "
                f"of shape {tuple(cached_key.shape)}; got {name} of shape {tuple(x.shape)}")
    if query.shape[:2] != key.shape[:2]:
        raise ValueError(
            "jax-flash: decoding takes as many new keys as queries; got query of shape "
            f"{tuple(query.shape)}, key of shape {tuple(key.shape)}")
    if key.shape[1] > max_length:
        raise ValueError(
            f"jax-flash: a chunk of {key.shape[1]} tokens does not fit a cache of max_length "
            f"{max_length}")


def append(cache, chunk, cache_lengths):
    """Writes chunk [batch, c, ...] into cache [batch, max_length, ...] at positions
    cache_lengths[b] + [0, c) of each sequence b.

    A scatter rather than lax.dynamic_update_slice because every sequence has its own offset;
    like the latter it updates the buffer in place when the cache is donated to jax.jit. Positions
    at or past max_length are dropped instead of clamped, so nothing valid is overwritten.
    """
    positions = cache_lengths[:, None] + jnp.arange(chunk.shape[1])
    rows = jnp.arange(chunk.shape[0])[:, None]
    return cache.at[rows, positions].set(chunk.astype(cache.dtype), mode="drop")


def query_positions(cache_lengths, chunk_length: int):
    """[batch, chunk]: the position in its sequence of each query of the chunk."""
    return cache_lengths[:, None] + jnp.arange(chunk_length)


def visible_keys(cache_lengths, chunk_length: int, max_length: int, window_left: int = -1):
    """[batch, 1, chunk, max_length] bool: query t of sequence b sees cached key j iff
    j <= its position cache_lengths[b] + t (and j >= position - window_left for a window)."""
    q_pos = query_positions(cache_lengths, chunk_length)[:, :, None]
    k_pos = jnp.arange(max_length)[None, None, :]
    visible = k_pos <= q_pos
    if window_left >= 0:
        visible = jnp.logical_and(visible, k_pos >= q_pos - window_left)
    return visible[:, None]


def poison_overflow(out, cache_lengths, chunk_lengths, max_length: int):
    """NaN for the real queries of out [batch, chunk, heads, d] whose position is past the cache:
    their keys were dropped, and a silently truncated context would look like a valid answer.
    Padding queries are left finite, so that NaN never appears in a call whose real tokens fit."""
    overflows = query_positions(cache_lengths, out.shape[1]) >= max_length
    real = jnp.arange(out.shape[1]) < chunk_lengths[:, None]
    return jnp.where((overflows & real)[:, :, None, None], jnp.nan, out)


def decode(query, key, value, cache, chunk_lengths, mask, window_size, attention):
    """One decoding call: appends key/value to cache = (cached_key, cached_value, cache_lengths),
    attends query [batch, chunk, heads, d] to the valid prefix, and advances each sequence by its
    chunk_lengths [batch] (None: the whole chunk). Returns (out, new cache).

    attention(query, key, value, mask) computes the attention itself; mask is combined with the
    user's mask, broadcastable to [batch, heads, chunk, max_length].
    """
    cached_key, cached_value, cache_lengths = cache
    check_chunk(cached_key, query, key, value)
    batch, max_length = cached_key.shape[:2]
    chunk = query.shape[1]
    if chunk_lengths is None:
        chunk_lengths = jnp.full((batch,), chunk, jnp.int32)
    elif jnp.shape(chunk_lengths) != (batch,):
        raise ValueError(
            f"jax-flash: chunk_lengths must be [batch] = ({batch},) (the valid tokens of each "
            f"sequence's chunk); got shape {jnp.shape(chunk_lengths)}")
    cached_key = append(cached_key, key, cache_lengths)
    cached_value = append(cached_value, value, cache_lengths)
    window_left = -1 if window_size is None else window_size[0]
    visible = visible_keys(cache_lengths, chunk, max_length, window_left)
    if mask is not None:
        check_broadcasts("mask", mask, (batch,), query.shape[2], chunk, max_length)
        visible = jnp.logical_and(visible, as_bool_mask(mask))
    out = attention(query, cached_key, cached_value, visible)
    chunk_lengths = jnp.asarray(chunk_lengths, cache_lengths.dtype)
    out = poison_overflow(out, cache_lengths, chunk_lengths, max_length)
    new_lengths = cache_lengths + chunk_lengths
    return out, (cached_key, cached_value, new_lengths)


def attend_cached(attend, query, key, value, visible):
    """decode's attention through flash_attention_fn (`attend`), the window left out: it is
    already in `visible`, relative to each query's position, whereas flash_attention would align
    it to the end of the cache."""
    return attend(query, key, value, mask=visible, window_size=None)


def resolve_call_inputs(inputs_q, inputs_k, inputs_v, decode: bool, q_segment_ids,
                        kv_segment_ids):
    """The modules' shared call-argument rules: k defaults to q and v to k, and segment ids are
    refused while decoding (the cache holds one sequence per batch row). Returns (k, v)."""
    for name, ids in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if decode and ids is not None:
            raise ValueError(f"jax-flash: {name} is not supported with decode=True (the "
                             "cache holds one sequence per batch row)")
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("jax-flash: inputs_v needs inputs_k (pass both, or neither)")
        inputs_k = inputs_q
    return inputs_k, inputs_k if inputs_v is None else inputs_v
