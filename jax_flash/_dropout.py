"""The dropout mask: which attention probabilities survive, as a pure function of the key and
each probability's position, the same in the CUDA kernels (cuda/dropout.h) and on the XLA path.

flash_attention turns dropout_rng into a seed of two uint32 words per batch element (so vmap
folding a batch keeps each element's mask). The probability of query i, key j in head h is kept
iff byte 2·((j >> 5) & 1) + (j & 1) of word (i >> 3) & 1 of Philox-2x32-10 (Salmon et al., 2011)
with key seed[0] and counter (h · seqlen_q + i with bit 3 cleared, (⌊j / 64⌋ · 16 +
⌊(j mod 32) / 2⌋) xor seed[1]) (mod 2³²) is at least rate · 256. One call so covers queries i,
i + 8 and keys j, j + 1, j + 32, j + 33, values one thread of the kernels holds; any tile of the
mask can be drawn on its own, so the backward regenerates the forward's mask exactly, whatever
the tiling. Rates are multiples of 1/256 (quantize_rate).
"""

import jax
import jax.numpy as jnp

_PHILOX_MULTIPLIER = 0xD256D193
_PHILOX_WEYL = 0x9E3779B9
RATE_STEPS = 256  # the mask compares bytes with rate · RATE_STEPS


def quantize_rate(rate: float) -> float:
    """The dropout rate the mask draws for `rate` in [0, 1): the nearest multiple of 1/256, at
    least one step when rate > 0 and at most 255/256."""
    if rate == 0:
        return 0.0
    return min(max(round(rate * RATE_STEPS), 1), RATE_STEPS - 1) / RATE_STEPS


def rate_threshold(rate: float) -> int:
    """The byte threshold of a rate (quantized first): bytes below it are dropped."""
    return round(quantize_rate(rate) * RATE_STEPS)


def _mul_hi_lo(a):
    """(high, low) 32-bit words of a · _PHILOX_MULTIPLIER for uint32 a, in 16-bit limbs (no uint64
    without jax_enable_x64)."""
    m_hi, m_lo = _PHILOX_MULTIPLIER >> 16, _PHILOX_MULTIPLIER & 0xFFFF
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_lo, lo_hi = a_lo * jnp.uint32(m_lo), a_lo * jnp.uint32(m_hi)
    hi_lo, hi_hi = a_hi * jnp.uint32(m_lo), a_hi * jnp.uint32(m_hi)
    middle = (lo_lo >> 16) + (lo_hi & 0xFFFF) + (hi_lo & 0xFFFF)
    high = hi_hi + (lo_hi >> 16) + (hi_lo >> 16) + (middle >> 16)
    return high, a * jnp.uint32(_PHILOX_MULTIPLIER)


def philox2x32_10(counter0, counter1, key):
    """The two output words of Philox-2x32-10 on uint32 arrays (broadcast together)."""
    for _ in range(10):
        high, low = _mul_hi_lo(counter0)
        counter0, counter1 = high ^ key ^ counter1, low
        key = key + jnp.uint32(_PHILOX_WEYL)
    return counter0, counter1


def dropout_seed(dropout_rng, batch: int):
    """uint32 [batch, 2]: one seed per batch element, from a typed or raw PRNG key."""
    return jax.random.bits(dropout_rng, (batch, 2), jnp.uint32)


def keep_mask(seed, rate: float, *, seqlen_q: int, kv_heads: int, group: int, query, key):
    """bool [b, kv_heads, group, len(query), len(key)]: True where the probability is kept.

    seed: uint32 [b, 2]; query and key: absolute positions; query head
    kv_head·group + g.
    """
    head = jnp.arange(kv_heads * group, dtype=jnp.uint32).reshape(kv_heads, group, 1, 1)
    query = query.astype(jnp.uint32)[:, None]
    key = key.astype(jnp.uint32)
    seed = seed.reshape(-1, 1, 1, 1, 1, 2)
    words = philox2x32_10(head * jnp.uint32(seqlen_q) + (query & ~jnp.uint32(8)),
                          ((key >> 6) << 4 | (key & 31) >> 1) ^ seed[..., 1], seed[..., 0])
    word = jnp.where((query >> 3) & 1 != 0, words[1], words[0])
    byte = (word >> (8 * (2 * ((key >> 5) & 1) + (key & 1)))) & 0xFF
    return byte >= jnp.uint32(rate_threshold(rate))


def dense_keep_mask(dropout_rng, rate: float, *, batch: int, heads: int, seqlen_q: int,
                    seqlen_k: int):
    """bool [batch, heads, seqlen_q, seqlen_k]: the whole mask flash_attention draws for this key
    and (quantized) rate, e.g. for attention_reference(dropout_keep=...)."""
    keep = keep_mask(dropout_seed(dropout_rng, batch), rate, seqlen_q=seqlen_q, kv_heads=heads,
                     group=1, query=jnp.arange(seqlen_q), key=jnp.arange(seqlen_k))
    return keep.reshape(batch, heads, seqlen_q, seqlen_k)
