"""vmap for the primitives: the mapped axis is folded into the batch dimension, which every
primitive of jax-flash takes at any size, so a vmapped call is still one call."""

import jax.numpy as jnp
from jax.interpreters import batching


def register_batch_folding(primitive, batch_broadcast=lambda params: {}) -> None:
    """Gives `primitive` (multiple results, every operand [batch, ...] with q's batch first) its
    batching rule. Unbatched operands are broadcast, so every result comes out mapped; where an
    unbatched input's cotangent must be summed over the mapped axis, JAX's custom_vjp does it.

    batch_broadcast(params) -> {operand index: index of its gradient among the results, or None}
    names the operands (mask, bias) whose batch dimension may be 1, broadcasting over q's batch.
    Such an operand left unbatched by vmap with batch 1 stays as it is, so it is never copied per
    mapped element, and its gradient comes out unmapped; one mapped with batch 1 while q's batch
    is larger is broadcast to q's batch, and its gradient summed back.
    """

    def batching_rule(args, batch_axes, **params):
        broadcast = batch_broadcast(params)
        size = next(x.shape[axis] for x, axis in zip(args, batch_axes) if axis is not None)
        q_shape = list(args[0].shape)
        if batch_axes[0] is not None:
            del q_shape[batch_axes[0]]
        batch = q_shape[0]
        folded, kept_unbatched, broadcast_batch = [], set(), set()
        for i, (x, axis) in enumerate(zip(args, batch_axes)):
            if i in broadcast and axis is None and x.shape[0] == 1:
                folded.append(x)
                kept_unbatched.add(i)
                continue
            x = jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)
            if i in broadcast and x.shape[1] != batch:
                x = jnp.broadcast_to(x, (size, batch, *x.shape[2:]))
                broadcast_batch.add(i)
            folded.append(x.reshape(size * x.shape[1], *x.shape[2:]))
        results = primitive.bind(*folded, **params)

        gradient_of = {r: i for i, r in broadcast.items() if r is not None}
        unfolded, out_axes = [], []
        for r, x in enumerate(results):
            operand = gradient_of.get(r)
            if operand in kept_unbatched:
                unfolded.append(x)
                out_axes.append(None)
                continue
            x = x.reshape(size, -1, *x.shape[1:])
            if operand in broadcast_batch:
                x = jnp.sum(x, axis=1, keepdims=True)
            unfolded.append(x)
            out_axes.append(0)
        return unfolded, out_axes

    batching.primitive_batchers[primitive] = batching_rule


def batch_broadcast_operands(config, first_extra: int, bias_grad_result: int | None = None):
    """For register_batch_folding: the mask and bias operands of a primitive whose feature
    operands (config.extra_operand_names()) start at index first_extra; the bias's gradient, if
    the primitive returns it, is result bias_grad_result."""
    names = config.extra_operand_names()
    return {first_extra + names.index(name): grad for name, grad in
            (("mask", None), ("bias", bias_grad_result)) if name in names}
