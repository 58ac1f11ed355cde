"""flash_attention: checks its inputs, resolves defaults, binds the forward primitive, and gives
it a custom VJP that binds the backward primitive."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters import ad

from jax_flash._bwd_primitive import flash_bwd_p
from jax_flash._config import FlashConfig
from jax_flash._dropout import dropout_seed
from jax_flash._fwd_primitive import flash_fwd_p
from jax_flash._kernel_choice import check_kernel_features, pad_head_dim
from jax_flash._segments import segment_operands
from jax_flash._sinks import add_sinks, sinks_grad
from jax_flash._validation import (
    check_alibi_slopes,
    check_broadcastable,
    check_dropout,
    check_common_options,
    check_flag,
    check_sinks,
    check_softcap,
    check_window_size,
)


# The names of what the forward pass keeps for the backward, in the order (q, k, v, out, lse).
# jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)) keeps
# exactly these and recomputes the rest of f; leaving "flash_attention_out" and
# "flash_attention_lse" out reruns the attention forward in the backward pass instead.
RESIDUAL_NAMES = ("flash_attention_q", "flash_attention_k", "flash_attention_v",
                  "flash_attention_out", "flash_attention_lse")


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False,
                    implementation=None, deterministic=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, mask=None, bias=None, dropout_rate=0.0, dropout_rng=None,
                    sinks=None, q_segment_ids=None, kv_segment_ids=None):
    """Scaled dot-product attention, softmax(q k^T * softmax_scale) v, without the score matrix.

    Args:
      q: [batch, seqlen_q, heads, head_dim] queries.
      k: [batch, seqlen_k, kv_heads, head_dim] keys; kv_heads divides heads (grouped-query and,
        with one kv head, multi-query attention): query head i uses kv head
        i // (heads // kv_heads).
      v: [batch, seqlen_k, kv_heads, head_dim_v] values. q, k and v share one dtype: float16,
        bfloat16, float32 (or float64 with x64 enabled); head_dim and head_dim_v are at most 256.
        head_dim_v may differ from head_dim (e.g. 192 for q and k with 128 for v, DeepSeek's
        MLA shape): the smaller is zero-padded to the larger, so the cost is that of the larger.
      causal: query i sees key j iff j <= i + seqlen_k - seqlen_q (aligned to the bottom right, as
        FlashAttention 2.1 and later). A query that sees no key (seqlen_q > seqlen_k) gets out = 0
        and lse = -inf, the log of an empty sum.
      softmax_scale: multiplies the scores; default 1 / sqrt(head_dim).
      return_lse: also return lse, the log-sum-exp of each row of scaled scores.
      implementation: None picks the CUDA kernels where they can run (a CUDA GPU of compute
        capability 8.0 or newer, an install built with the kernels, float16 or bfloat16 inputs,
        no feature below but grouped-query attention, window_size, softcap, alibi_slopes (not
        with flash_attention_varlen), dropout, sinks, segment ids, mask and bias (not with
        softcap; in the deterministic backward, not a differentiated bias that broadcasts)) and
        the XLA path otherwise, for each pass; "cuda" insists on the kernels and raises where
        they cannot run, naming the features they lack; "xla" takes the pure-JAX blockwise path
        on every platform.
      deterministic: make the backward pass bitwise reproducible from run to run: the CUDA
        backward kernel then sums dq in a fixed order instead of with atomics. The pure-JAX
        backward always is.
      window_size: (left, right), sliding-window attention: query i sees key j iff
        i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; -1 leaves a side
        unbounded. Combines with causal (which bounds the right side at 0).
      softcap: above 0, the scaled scores s become softcap * tanh(s / softcap) (Gemma 2).
      alibi_slopes: float [heads] or [batch, heads]: adds -slope * |i + seqlen_k - seqlen_q - j|
        to the scores (ALiBi, aligned like causal).
      mask: boolean, broadcastable to [batch, heads, seqlen_q, seqlen_k] as in
        jax.nn.dot_product_attention: True where query i may attend to key j.
      bias: float, broadcastable to [batch, heads, seqlen_q, seqlen_k], added to the scores after
        softcap and ALiBi.
      dropout_rate: the probability in [0, 1) of dropping each attention probability, rounded
        to a multiple of 1/256; the kept ones are scaled by 1 / (1 - dropout_rate). 0 does no
        random-number work at all.
      dropout_rng: a JAX PRNG key, needed when dropout_rate > 0. The same key gives the same
        mask, forward and backward, on the CUDA kernels and the XLA path alike (see _dropout).
      sinks: float [heads]: one logit per query head that joins each row's softmax denominator
        and contributes no value (attention sinks, as in gpt-oss); lse includes it.
      q_segment_ids: integer [batch, seqlen_q] (cast to int32): packed sequences. Query i sees
        key j only when q_segment_ids[i] == kv_segment_ids[j]; a negative id is padding, which
        sees and is seen by nothing (out 0, lse -inf, gradient 0). Every other option applies
        within that, causal, window_size and ALiBi on the positions in the row as above (so
        with q and k packed alike, causal is causal within each segment). Not differentiable.
      kv_segment_ids: integer [batch, seqlen_k]; defaults to q_segment_ids when seqlen_q ==
        seqlen_k. flash_attention_varlen takes the same packing as cu_seqlens.

    Returns:
      out [batch, seqlen_q, heads, head_dim_v] in q's dtype, or (out, lse) with lse float32
      [batch, heads, seqlen_q] when return_lse is set.

    Reverse mode (jax.grad, jax.vjp) works, with respect to q, k, v, bias, alibi_slopes and sinks
    and through out and lse alike, in O(seqlen) memory: the backward recomputes the scores a tile
    at a time from the residuals named in RESIDUAL_NAMES. Forward mode (jax.jvp, jax.jacfwd)
    raises JAX's TypeError for functions with a custom VJP, and derivatives of the gradient
    (jax.hessian, grad of grad) raise NotImplementedError.
    """
    return flash_attention_with_positions(
        q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
        implementation=implementation, deterministic=deterministic, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, mask=mask, bias=bias,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, sinks=sinks,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, positions=None)


def flash_attention_with_positions(q, k, v, *, causal, softmax_scale, return_lse, implementation,
                                   deterministic, window_size, softcap, alibi_slopes, mask, bias,
                                   dropout_rate, dropout_rng, sinks, q_segment_ids,
                                   kv_segment_ids, positions):
    """flash_attention, with one more option for flash_attention_varlen: positions, None or
    int32 ([batch, seqlen_q], [batch, seqlen_k]) per-token positions that replace
    i + seqlen_k - seqlen_q and j in causal, window_size and ALiBi (see _tile_scores)."""
    q, k, v = (_as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    scale, return_lse = check_common_options(q, k, v, implementation, softmax_scale, return_lse,
                                             value_head_dim_may_differ=True)
    batch, seqlen_q, heads, head_dim = q.shape
    scores_shape = (batch, heads, seqlen_q, k.shape[1])
    extras = {}
    if alibi_slopes is not None:
        alibi_slopes = _as_array("alibi_slopes", alibi_slopes)
        check_alibi_slopes(alibi_slopes, batch, heads)
        extras["alibi_slopes"] = jnp.broadcast_to(alibi_slopes.astype(jnp.float32),
                                                  (batch, heads))
    for name, x, kind in (("mask", mask, jnp.bool_), ("bias", bias, jnp.floating)):
        if x is not None:
            x = _as_array(name, x)
            check_broadcastable(name, x, scores_shape, kind)
            extras[name] = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if q_segment_ids is not None:
        q_segment_ids = _as_array("q_segment_ids", q_segment_ids)
    if kv_segment_ids is not None:
        kv_segment_ids = _as_array("kv_segment_ids", kv_segment_ids)
    extras.update(segment_operands(q_segment_ids, kv_segment_ids, batch, seqlen_q, k.shape[1]))
    if positions is not None:
        extras["q_positions"], extras["kv_positions"] = positions
    rate = check_dropout(dropout_rate, None if dropout_rng is None else
                         _as_array("dropout_rng", dropout_rng))
    if rate > 0:
        extras["dropout_seed"] = dropout_seed(dropout_rng, batch)
    if sinks is not None:
        sinks = _as_array("sinks", sinks)
        check_sinks(sinks, heads)
        sinks = sinks.astype(jnp.float32)
    config = FlashConfig(
        causal=check_flag("causal", causal),
        softmax_scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        implementation=implementation,
        deterministic=check_flag("deterministic", deterministic),
        window_size=check_window_size(window_size),
        softcap=check_softcap(softcap),
        dropout_rate=rate,
        has_alibi_slopes="alibi_slopes" in extras,
        has_mask="mask" in extras,
        has_bias="bias" in extras,
        has_segment_ids="q_segment_ids" in extras,
        has_positions="q_positions" in extras,
    )
    if implementation == "cuda":
        check_kernel_features(config)
    # A head_dim of v unlike q's and k's: zero-pad the smaller to the larger, which changes no
    # score and no output column, and slice the output back (the cost is that of the larger).
    value_head_dim = v.shape[3]
    if value_head_dim != head_dim:
        width = max(head_dim, value_head_dim)
        q, k, v = (pad_head_dim(x, width) for x in (q, k, v))
    out, lse = _attention(q, k, v, tuple(extras[name] for name in config.extra_operand_names()),
                          sinks, config)
    out = out[..., :value_head_dim]
    return (out, lse) if return_lse else out


def _as_array(name: str, x):
    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"jax-flash: {name} must be an array; got {type(x).__name__}")
    return x


# ---- differentiation -------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, extras, sinks, config: FlashConfig):
    return _forward(q, k, v, extras, sinks, config)


def _forward(q, k, v, extras, sinks, config: FlashConfig):
    out, lse = flash_fwd_p.bind(q, k, v, *extras, config=config)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out, lse


def _attention_fwd(q, k, v, extras, sinks, config: FlashConfig):
    out, lse = _forward(q, k, v, extras, sinks, config)
    residuals = tuple(checkpoint_name(x, name) for x, name in zip((q, k, v, out, lse),
                                                                  RESIDUAL_NAMES))
    return (out, lse), (residuals, extras, sinks)


def _attention_bwd(config: FlashConfig, residuals, cotangents):
    residuals, extras, sinks = residuals
    dout, dlse = cotangents  # dlse is zeros where lse is not differentiated
    # With sinks, out and lse are the results with the sinks, which is what the backward needs
    # (see _sinks).
    dq, dk, dv, *feature_grads = flash_bwd_p.bind(*residuals, dout, dlse, *extras, config=config)
    grad_of = dict(zip([name for name in ("bias", "alibi_slopes")
                        if name in config.extra_operand_names()], feature_grads))
    # mask, segment ids, positions and dropout_seed are not differentiable: their cotangents are
    # float0 zeros.
    dextras = tuple(grad_of[name] if name in grad_of else np.zeros(x.shape, jax.dtypes.float0)
                    for name, x in zip(config.extra_operand_names(), extras))
    _, _, _, out, lse = residuals
    dsinks = None if sinks is None else sinks_grad(out, lse, dout, dlse, sinks)
    return dq, dk, dv, dextras, dsinks


_attention.defvjp(_attention_fwd, _attention_bwd)


# First derivatives go through the custom VJP and never differentiate a primitive; a derivative
# of the gradient does: the outer one meets jax_flash_fwd (in the inner VJP's forward) and
# jax_flash_bwd. Both refuse by name rather than with JAX's generic "rule not implemented".
def _refuse_higher_order(primals, tangents, **params):
    raise NotImplementedError(
        "jax-flash: higher-order derivatives of flash_attention are not supported (grad of grad, "
        "jax.hessian); differentiate it once, in reverse mode")


ad.primitive_jvps[flash_fwd_p] = _refuse_higher_order
ad.primitive_jvps[flash_bwd_p] = _refuse_higher_order
