"""flash_attention_varlen: FlashAttention's variable-length form, sequences packed back to back
along one token axis and delimited by cu_seqlens.

It runs as one row of segment ids (the sequence index of each token) through flash_attention's
primitives, plus per-token positions counted from the end of each sequence: query a of a
sequence of lengths (len_q, len_k) sees key c iff c <= a + len_k - len_q, i.e. iff
key − cu_seqlens_k[s + 1] <= query − cu_seqlens_q[s + 1] in packed indices, so every sequence is
aligned at its own bottom right, for causal, window_size and ALiBi alike.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._attention import flash_attention_with_positions
from jax_flash._segments import as_cu_seqlens, check_cu_seqlens, cu_seqlens_to_segment_ids
from jax_flash._validation import check_flag


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           causal=False, softmax_scale=None, return_lse=False,
                           implementation=None, deterministic=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, mask=None, bias=None,
                           dropout_rate=0.0, dropout_rng=None, sinks=None):
    """Attention of each packed sequence with itself, without padding to the longest.

    Args:
      q: [total_q, heads, head_dim], the queries of every sequence back to back.
      k, v: [total_k, kv_heads, head_dim], keys and values likewise (kv_heads divides heads).
      cu_seqlens_q, cu_seqlens_k: integers [num_sequences + 1], non-decreasing from 0 to
        total_q (total_k): sequence s holds queries cu_seqlens_q[s] to cu_seqlens_q[s + 1] − 1
        and keys cu_seqlens_k[s] to cu_seqlens_k[s + 1] − 1. Empty sequences are allowed; a
        query whose sequence has no key gets out 0 and lse -inf.
      max_seqlen_q, max_seqlen_k: static ints bounding each sequence's length, as FlashAttention
        takes them.
      causal, window_size, alibi_slopes ([heads] only): as in flash_attention, aligned at the
        bottom right of each sequence (query a sees key c iff c <= a + len_k − len_q).
      mask, bias: broadcastable to [heads, total_q, total_k], over the packed tokens.
      softmax_scale, return_lse, implementation, deterministic, softcap, dropout_rate,
        dropout_rng, sinks: as in flash_attention.

    Returns:
      out [total_q, heads, head_dim] in q's dtype, or (out, lse) with lse float32
      [heads, total_q] (FlashAttention's varlen layout) when return_lse is set.

    Works under jit, vmap (any in_axes, cu_seqlens included) and grad (with respect to q, k, v
    and the float options, as flash_attention). Where cu_seqlens are concrete, values that do
    not start at 0, decrease, end elsewhere than at total_q / total_k or exceed max_seqlen raise
    ValueError; under jit they cannot be checked, and tokens outside [0, cu_seqlens[-1]) are
    then treated as padding (out 0), while decreasing values give meaningless results.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 3:
            raise ValueError(
                f"jax-flash: flash_attention_varlen takes {name} packed as 3-D [total_tokens, "
                f"heads, head_dim]; got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    total_q, total_k = q.shape[0], k.shape[0]
    cu_seqlens_q = as_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_seqlens_k = as_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or (
                value < 1):
            raise TypeError(f"jax-flash: {name} must be a static int >= 1; got {value!r}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, exact_total=True,
                     max_seqlen=int(max_seqlen_q))
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, exact_total=True,
                     max_seqlen=int(max_seqlen_k))
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            "jax-flash: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences;"
            f" got shapes {list(cu_seqlens_q.shape)} and {list(cu_seqlens_k.shape)}")
    if alibi_slopes is not None and len(jnp.shape(alibi_slopes)) != 1:
        raise ValueError(
            f"jax-flash: flash_attention_varlen takes alibi_slopes [heads] = [{q.shape[1]}]; got "
            f"shape {list(jnp.shape(alibi_slopes))}")
    mask, bias = (None if x is None else _packed_scores_operand(name, x, q, k)
                  for name, x in (("mask", mask), ("bias", bias)))

    q_ids, q_positions = _sequence_layout(cu_seqlens_q, total_q)
    kv_ids, kv_positions = _sequence_layout(cu_seqlens_k, total_k)
    return_lse = check_flag("return_lse", return_lse)
    out, lse = flash_attention_with_positions(
        q[None], k[None], v[None], causal=causal, softmax_scale=softmax_scale, return_lse=True,
        implementation=implementation, deterministic=deterministic, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, mask=mask, bias=bias,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, sinks=sinks,
        q_segment_ids=q_ids[None], kv_segment_ids=kv_ids[None],
        positions=(q_positions[None], kv_positions[None]))
    return (out[0], lse[0]) if return_lse else out[0]


def _sequence_layout(cu_seqlens, total: int):
    """(int32 [total] sequence index, -1 past the last; int32 [total] position counted from the
    end of its sequence: -1 for its last token)."""
    sequence = cu_seqlens_to_segment_ids(cu_seqlens, total)
    ends = cu_seqlens.astype(jnp.int32)[jnp.maximum(sequence, 0) + 1]
    positions = jnp.arange(total, dtype=jnp.int32) - ends
    return sequence, jnp.where(sequence >= 0, positions, 0)


def _packed_scores_operand(name: str, x, q, k):
    """mask or bias over [heads, total_q, total_k] -> 4-D with batch 1, for flash_attention."""
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array) or len(x.shape) > 3:
        raise ValueError(
            f"jax-flash: flash_attention_varlen takes {name} broadcastable to [heads, total_q, "
            f"total_k] = [{q.shape[1]}, {q.shape[0]}, {k.shape[0]}]; got "
            f"{getattr(x, 'shape', type(x).__name__)}")
    return x[None]
