"""The dropout mask of the XLA path: which attention probabilities survive, as a pure function of
the key and each probability's position.

flash_attention turns dropout_rng into one threefry seed per batch element (so vmap folding a
batch keeps each element's mask); the keep bit of the probability of query i, key j in head h is
threefry2x32(seed; h · seqlen_q + i, j) ≥ dropout_rate · 2³², so any tile of it can be drawn on
its own and the backward regenerates the forward's mask exactly, whatever the tiling. The CUDA
kernel, when it gains dropout, will draw a different mask from the same key.
"""

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32


def dropout_seed(dropout_rng, batch: int):
    """uint32 [batch, 2]: one threefry seed per batch element, from a typed or raw PRNG key."""
    return jax.random.bits(dropout_rng, (batch, 2), jnp.uint32)


def keep_mask(seed, rate: float, *, seqlen_q: int, kv_heads: int, group: int, query, key):
    """bool [b, kv_heads, group, len(query), len(key)]: True where the probability is kept.

    seed: uint32 [b, 2]; query and key: absolute positions; query head kv_head·group + g.
    """
    head = jnp.arange(kv_heads * group, dtype=jnp.uint32).reshape(kv_heads, group, 1, 1)
    row = head * jnp.uint32(seqlen_q) + query.astype(jnp.uint32)[:, None]
    column = jnp.broadcast_to(key.astype(jnp.uint32), row.shape[:-1] + key.shape)
    counters = jnp.stack(jnp.broadcast_arrays(row, column))  # [2, kv_heads, group, sq, sk]
    # threefry2x32 hashes counter pairs (counters[0], counters[1]); the first word is the bit.
    bits = jax.vmap(lambda s: threefry_2x32((s[0], s[1]), counters)[0])(seed)
    threshold = min(round(rate * 2**32), 2**32 - 1)
    return bits >= jnp.uint32(threshold)


def dense_keep_mask(dropout_rng, rate: float, *, batch: int, heads: int, seqlen_q: int,
                    seqlen_k: int):
    """bool [batch, heads, seqlen_q, seqlen_k]: the whole mask flash_attention's XLA path draws
    for this key, e.g. for attention_reference(dropout_keep=...)."""
    keep = keep_mask(dropout_seed(dropout_rng, batch), rate, seqlen_q=seqlen_q, kv_heads=heads,
                     group=1, query=jnp.arange(seqlen_q), key=jnp.arange(seqlen_k))
    return keep.reshape(batch, heads, seqlen_q, seqlen_k)
