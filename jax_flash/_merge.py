"""Combining attention computed over disjoint sets of keys: the step that joins split-KV and ring
attention's partial results.

Attention over keys K₁ ∪ K₂ is a weighted average of the attentions over K₁ and over K₂, each
weighted by its share of the softmax denominator, exp(lseᵢ − lse), where lse = log Σᵢ exp(lseᵢ).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge_attention_states(outs: Sequence[jax.Array], lses: Sequence[jax.Array]):
    """Merges partial attentions over disjoint key sets into the attention over their union.

    Args:
      outs: one or more partial outputs, each [batch, seqlen_q, heads, head_dim], of one dtype.
      lses: their log-sum-exps, each float32 [batch, heads, seqlen_q], as flash_attention returns
        with return_lse=True. An lse of -inf marks a row that saw no key in that part.

    Returns:
      (out, lse): out [batch, seqlen_q, heads, head_dim] in the outs' dtype and lse float32
      [batch, heads, seqlen_q]. A row that saw no key in any part gets out = 0 and lse = -inf.
      Differentiable with respect to every out and lse, with no NaN on -inf rows.
    """
    outs, lses = list(outs), list(lses)
    _check_states(outs, lses)
    lses = jnp.stack(lses)  # [parts, b, h, sq]
    # The largest lse shifts the exponentials; the result does not depend on it, so neither does
    # the gradient. Rows that are -inf everywhere shift by 0, keeping every weight at exp(-inf) = 0.
    shift = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    shift = jnp.where(jnp.isneginf(shift), 0.0, shift)
    weights = jnp.exp(lses - shift)  # [parts, b, h, sq]
    total = jnp.sum(weights, axis=0)
    empty = total == 0
    safe_total = jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, shift + jnp.log(safe_total))
    # [parts, b, h, sq] -> [parts, b, sq, h, 1], the layout of the outs.
    shares = jnp.transpose(weights / safe_total, (0, 1, 3, 2))[..., None]
    out = jnp.sum(shares * jnp.stack(outs).astype(jnp.float32), axis=0)
    return out.astype(outs[0].dtype), lse


def _check_states(outs, lses) -> None:
    if not outs or len(outs) != len(lses):
        raise ValueError(
            "jax-flash: merge_attention_states needs one lse per out, at least one of each; got "
            f"{len(outs)} outs and {len(lses)} lses")
    first = outs[0]
    if len(first.shape) != 4:
        raise ValueError(
            "jax-flash: merge_attention_states: outs[0] must be 4-D [batch, seqlen_q, heads, "
            f"head_dim]; got shape {tuple(first.shape)}")
    batch, seqlen_q, heads, _ = first.shape
    lse_shape = (batch, heads, seqlen_q)
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if tuple(out.shape) != tuple(first.shape) or out.dtype != first.dtype:
            raise ValueError(
                f"jax-flash: merge_attention_states: outs[{i}] is "
                f"{jnp.dtype(out.dtype).name}{list(out.shape)}; every out must match outs[0], "
                f"{jnp.dtype(first.dtype).name}{list(first.shape)}")
        if tuple(lse.shape) != lse_shape or lse.dtype != jnp.float32:
            raise ValueError(
                f"jax-flash: merge_attention_states: lses[{i}] is "
                f"{jnp.dtype(lse.dtype).name}{list(lse.shape)}; expected float32{list(lse_shape)} "
                f"[batch, heads, seqlen_q] for outs of shape {list(first.shape)}")
