"""vmap for the primitives: the mapped axis is folded into the batch dimension, which every
primitive of jax-flash takes at any size, so a vmapped call is still one call."""

import jax.numpy as jnp
from jax.interpreters import batching


def register_batch_folding(primitive) -> None:
    """Gives `primitive` (multiple results, every operand and result [batch, ...]) its batching
    rule. Unbatched operands are broadcast, so every result comes out mapped; where an unbatched
    input's cotangent must be summed over the mapped axis, JAX's custom_vjp does it."""

    def batching_rule(args, batch_axes, **params):
        size = next(x.shape[axis] for x, axis in zip(args, batch_axes) if axis is not None)
        folded = []
        for x, axis in zip(args, batch_axes):
            x = jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)
            folded.append(x.reshape(size * x.shape[1], *x.shape[2:]))
        results = primitive.bind(*folded, **params)
        return [x.reshape(size, -1, *x.shape[1:]) for x in results], (0,) * len(results)

    batching.primitive_batchers[primitive] = batching_rule
