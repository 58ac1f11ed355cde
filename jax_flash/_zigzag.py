"""The zigzag sequence layout that balances causal ring attention across devices.

With the sequence cut into 2n equal chunks for n devices, device i holds chunks i and 2n-1-i: an
early chunk, which sees few keys, and a late one, which sees many, so under a causal mask every
device does the same work. to_zigzag reorders a whole sequence so that the ordinary contiguous
split (a NamedSharding over the sequence axis, or shard_map's in_specs) hands out exactly that;
from_zigzag puts the result back in order. Positions for rotary embeddings come the same way:
to_zigzag(jnp.arange(seqlen), n, axis=0).
"""

import jax.numpy as jnp
import numpy as np


def zigzag_chunk_order(num_shards: int) -> np.ndarray:
    """The chunk order of the zigzag layout: 0, 2n-1, 1, 2n-2, ..., n-1, n."""
    first = np.arange(num_shards)
    return np.stack([first, 2 * num_shards - 1 - first], axis=1).reshape(-1)


def to_zigzag(x, num_shards: int, *, axis: int = 1):
    """x with its sequence `axis` (default 1, as in [batch, seqlen, heads, head_dim]) reordered
    into the zigzag layout for `num_shards` devices; that axis must split into 2 · num_shards
    equal chunks."""
    return _reorder(x, num_shards, axis, zigzag_chunk_order(num_shards), "to_zigzag")


def from_zigzag(x, num_shards: int, *, axis: int = 1):
    """to_zigzag undone: the sequence `axis` back in its natural order."""
    order = np.argsort(zigzag_chunk_order(num_shards))
    return _reorder(x, num_shards, axis, order, "from_zigzag")


def _reorder(x, num_shards: int, axis: int, chunk_order: np.ndarray, name: str):
    x = jnp.asarray(x)
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
            or num_shards < 1:
        raise ValueError(f"jax-flash: {name}: num_shards must be a positive int; "
                         f"got {num_shards!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"jax-flash: {name}: axis {axis} is out of range for x of shape "
                         f"{tuple(x.shape)}")
    axis %= x.ndim
    seqlen = x.shape[axis]
    chunks = 2 * num_shards
    if seqlen % chunks:
        raise ValueError(
            f"jax-flash: {name}: the sequence axis {axis} of x {tuple(x.shape)} has length "
            f"{seqlen}, which does not split into 2 * num_shards = {chunks} equal chunks")
    split = x.reshape(*x.shape[:axis], chunks, seqlen // chunks, *x.shape[axis + 1:])
    return jnp.take(split, chunk_order, axis=axis).reshape(x.shape)
