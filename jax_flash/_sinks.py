"""Attention sinks (as in gpt-oss): one learnable logit per head that joins every row's softmax
denominator and contributes no value. They sit around the primitives, so the kernels and the XLA
path run them alike.

With lse and out the attention over the keys alone, a sink s adds exp(s) to the denominator:

    lse' = log(exp(lse) + exp(s)) = logaddexp(lse, s),    out' = out · exp(lse − lse').

The backward primitives recompute each probability from the lse they are given, so given lse'
they recompute the probabilities with the sink, p'ᵢⱼ = exp(sᵢⱼ − lse'). The sink is one more
column of scores whose value is 0: its dp is 0, so for the keys ds = p' ∘ (dp − D') with
D' = rowsum(dout ∘ out') − dlse', the primitives' own formula on (out', lse'). Passing them out'
and lse' thus gives dq, dk, dv exactly, and the sink's own column gives

    d sink = Σ_rows p'_sink · (0 − D') = −Σ_rows exp(s − lse') · D'.
"""

import jax.numpy as jnp


def add_sinks(out, lse, sinks):
    """(out', lse') from the attention out [b, sq, h, d], lse [b, h, sq] over the keys alone and
    sinks float32 [h]."""
    sink = sinks[None, :, None]
    new_lse = jnp.logaddexp(lse, sink)
    # A row whose keys and sink are all -inf stays out = 0 (exp(-inf - -inf) would be NaN).
    share = jnp.where(jnp.isneginf(new_lse), 0.0, jnp.exp(lse - new_lse))  # [b, h, sq]
    scaled = out.astype(jnp.float32) * jnp.transpose(share, (0, 2, 1))[..., None]
    return scaled.astype(out.dtype), new_lse


def sinks_grad(out, lse, dout, dlse, sinks):
    """d sinks [h], from out = out' and lse = lse' (the results with the sinks, as add_sinks
    returns them) and their cotangents dout, dlse."""
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # [b, sq, h]
    delta = jnp.transpose(delta, (0, 2, 1)) - dlse  # [b, h, sq]
    sink_probs = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(sinks[None, :, None] - lse))
    return -jnp.sum(sink_probs * delta, axis=(0, 2))
