"""Flax's dense attention masks, read for jax_flash.flash_attention.

Flax passes masks as arrays broadcastable to [batch..., heads, seqlen_q, seqlen_k], True (or
nonzero) where a query may see a key. A concrete mask that allows everything, or that is exactly
our causal pattern, becomes "no mask" or causal=True: the kernel then skips the mask reads (and
for causal the hidden tiles). Every other mask, and every traced one, is passed as
flash_attention's mask= argument.
"""

import jax
import jax.numpy as jnp
import numpy as np


def check_broadcasts(name: str, x, batch_shape: tuple, heads: int, seqlen_q: int,
                     seqlen_k: int) -> None:
    """Raises ValueError unless x broadcasts to [*batch_shape, heads, seqlen_q, seqlen_k]."""
    if not isinstance(x, (np.ndarray, jax.Array)):
        raise TypeError(f"jax-flash: {name} must be an array; got {type(x).__name__}")
    full = (*batch_shape, heads, seqlen_q, seqlen_k)
    shape = tuple(x.shape)
    if len(shape) > len(full) or any(
            size not in (1, want) for size, want in zip(shape[::-1], full[::-1])):
        raise ValueError(
            f"jax-flash: {name} of shape {shape} does not broadcast to [batch..., heads, "
            f"seqlen_q, seqlen_k] = {full}")


def to_4d(x, batch_shape: tuple):
    """x (checked by check_broadcasts) as [batch or 1, heads or 1, seqlen_q or 1, seqlen_k or 1],
    the batch dims folded into one; broadcast dims stay 1 where the batch allows it."""
    x = jnp.reshape(x, (1,) * (len(batch_shape) + 3 - x.ndim) + tuple(x.shape))
    batch_sizes = x.shape[:len(batch_shape)]
    if all(size == 1 for size in batch_sizes):
        return jnp.reshape(x, (1, *x.shape[len(batch_shape):]))
    x = jnp.broadcast_to(x, (*batch_shape, *x.shape[len(batch_shape):]))
    return jnp.reshape(x, (-1, *x.shape[len(batch_shape):]))


def as_bool_mask(mask):
    """Flax masks may be float (nn.make_causal_mask gives float32 by default): nonzero keeps."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def causal_pattern(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """[seqlen_q, seqlen_k], True where flash_attention(causal=True) lets query i see key j:
    j <= i + seqlen_k - seqlen_q (aligned to the bottom right)."""
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def recognize_mask(mask, seqlen_q: int, seqlen_k: int):
    """Returns (mask or None, causal) for a mask whose last two dims broadcast to
    [seqlen_q, seqlen_k]: (None, False) if it allows everything, (None, True) if it is exactly
    causal_pattern, else (mask, False).

    Only a concrete mask is read (a numpy array, or a jax array outside a trace or closed over by
    a jitted function); a traced one (any mask computed inside jax.jit) is returned as is.
    """
    if mask is None or isinstance(mask, jax.core.Tracer):
        return mask, False
    values = np.asarray(mask) != 0
    if values.all():
        return None, False
    if values.shape[-2:] == (seqlen_q, seqlen_k) and (values == causal_pattern(seqlen_q,
                                                                               seqlen_k)).all():
        return None, True
    return mask, False
