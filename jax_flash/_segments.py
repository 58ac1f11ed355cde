"""Segment ids: several sequences packed into one row, attending only within themselves.

A query sees a key only when both carry the same segment id; a negative id marks padding, which
sees and is seen by nothing (its query rows give out 0 and lse -inf, and gradient 0). Equal ids
mean one segment wherever the tokens lie, as in splash attention; ids need not be contiguous or
sorted. The ids travel to the primitives as [batch, seqlen] operands and the XLA path compares
them a tile at a time, so no [seqlen_q, seqlen_k] mask is ever built.

cu_seqlens, FlashAttention's form of the same packing (sequence s holds the tokens
cu_seqlens[s] to cu_seqlens[s + 1] − 1), converts both ways with a static number of segments, so
the helpers run under jit and vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._validation import check_segment_ids

# The id of a token in no segment: what cu_seqlens_to_segment_ids gives tokens past the last
# sequence. Any negative id is padding.
PADDING_ID = -1


def segment_operands(q_segment_ids, kv_segment_ids, batch: int, seqlen_q: int, seqlen_k: int):
    """{"q_segment_ids", "kv_segment_ids"}: int32 operands of the primitives, kv's defaulting to
    q's when the seqlens match; {} when neither is given."""
    if q_segment_ids is None:
        if kv_segment_ids is not None:
            raise ValueError("jax-flash: kv_segment_ids needs q_segment_ids as well")
        return {}
    check_segment_ids("q_segment_ids", q_segment_ids, batch, seqlen_q, "q")
    if kv_segment_ids is None:
        if seqlen_q != seqlen_k:
            raise ValueError(
                f"jax-flash: kv_segment_ids defaults to q_segment_ids only when seqlen_q == "
                f"seqlen_k; got seqlen_q {seqlen_q}, seqlen_k {seqlen_k}: pass kv_segment_ids "
                f"[batch, seqlen_k] = [{batch}, {seqlen_k}]")
        kv_segment_ids = q_segment_ids
    check_segment_ids("kv_segment_ids", kv_segment_ids, batch, seqlen_k, "k")
    return {"q_segment_ids": q_segment_ids.astype(jnp.int32),
            "kv_segment_ids": kv_segment_ids.astype(jnp.int32)}


def cu_seqlens_to_segment_ids(cu_seqlens, total: int):
    """int32 [total]: the index of the sequence holding each of `total` packed tokens.

    cu_seqlens: integers [num_sequences + 1], non-decreasing from 0 (FlashAttention's varlen
    form); sequence s holds tokens cu_seqlens[s] to cu_seqlens[s + 1] − 1, so an empty sequence
    holds none and its index appears nowhere. Tokens from cu_seqlens[-1] on get -1 (padding).
    Works under jit and vmap; cu_seqlens is checked only where its values are concrete.
    """
    cu_seqlens = as_cu_seqlens("cu_seqlens", cu_seqlens)
    total = _static_count("total", total)
    check_cu_seqlens("cu_seqlens", cu_seqlens, total, exact_total=False)
    token = jnp.arange(total, dtype=jnp.int32)
    # The last s with cu_seqlens[s] <= token: searching the right side skips empty sequences.
    sequence = jnp.searchsorted(cu_seqlens, token, side="right").astype(jnp.int32) - 1
    inside = (token >= cu_seqlens[0]) & (token < cu_seqlens[-1])
    return jnp.where(inside, sequence, PADDING_ID)


def segment_ids_to_cu_seqlens(segment_ids, max_segments: int):
    """int32 [max_segments + 1]: the cu_seqlens of a row of segment ids [seqlen].

    Each maximal run of equal non-negative ids is one sequence, in order; padding (negative ids)
    may only follow the last run, and cu_seqlens[-1] counts the tokens before it. Fewer runs than
    max_segments leave empty sequences at the end (cu_seqlens repeats its last value). For a
    batch of rows, jax.vmap it. With concrete ids, more runs than max_segments or padding before
    a run raise ValueError; under jit they are not checked, and runs past max_segments are
    dropped (their tokens are left out of cu_seqlens[-1]).
    """
    if isinstance(segment_ids, np.ndarray):
        segment_ids = jnp.asarray(segment_ids)
    if len(segment_ids.shape) != 1 or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            "jax-flash: segment_ids_to_cu_seqlens takes one row of integer segment ids [seqlen] "
            f"(jax.vmap it for a batch); got {jnp.dtype(segment_ids.dtype).name}"
            f"{list(segment_ids.shape)}")
    max_segments = _static_count("max_segments", max_segments)
    ids = segment_ids.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    run = jnp.cumsum(starts & (ids >= 0)) - 1  # the run each token belongs to
    _check_runs(ids, run, max_segments)
    counts = jnp.zeros((max_segments,), jnp.int32).at[jnp.where(ids >= 0, run, max_segments)].add(
        1, mode="drop")
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def check_cu_seqlens(name: str, cu_seqlens, total: int, *, exact_total: bool,
                     max_seqlen: int | None = None) -> None:
    """cu_seqlens [n + 1]: integers; where its values are concrete, also starting at 0,
    non-decreasing, ending at `total` (at most `total` unless exact_total) and with no sequence
    longer than max_seqlen."""
    if len(cu_seqlens.shape) != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"jax-flash: {name} must be 1-D [num_sequences + 1] with at least 2 entries; got "
            f"shape {list(cu_seqlens.shape)}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise TypeError(
            f"jax-flash: {name} must be an integer array (int32); got "
            f"{jnp.dtype(cu_seqlens.dtype).name}{list(cu_seqlens.shape)}")
    values = _concrete(cu_seqlens)
    if values is None:
        return
    lengths = np.diff(values)
    if values[0] != 0 or (lengths < 0).any():
        raise ValueError(
            f"jax-flash: {name} must start at 0 and never decrease (sequence s holds tokens "
            f"{name}[s] to {name}[s + 1] - 1); got {values.tolist()}")
    if values[-1] > total or (exact_total and values[-1] != total):
        raise ValueError(
            f"jax-flash: {name}[-1] = {values[-1]} must equal the number of packed tokens, "
            f"{total}; got {name} {values.tolist()}")
    if max_seqlen is not None and lengths.max() > max_seqlen:
        raise ValueError(
            f"jax-flash: {name} holds a sequence of {lengths.max()} tokens, longer than "
            f"max_seqlen_{name[-1]} = {max_seqlen}")


def _check_runs(ids, run, max_segments: int) -> None:
    ids, run = _concrete(ids), _concrete(run)
    if ids is None:
        return
    padding = np.flatnonzero(ids < 0)
    if padding.size and (ids[padding[0]:] >= 0).any():
        raise ValueError(
            f"jax-flash: segment_ids_to_cu_seqlens: padding (a negative id) at token "
            f"{padding[0]} comes before a segment; cu_seqlens can only hold padding at the end")
    if run.size and run.max() + 1 > max_segments:
        raise ValueError(
            f"jax-flash: segment_ids_to_cu_seqlens: the ids hold {run.max() + 1} segments, more "
            f"than max_segments = {max_segments}")


def as_cu_seqlens(name: str, x):
    if isinstance(x, (np.ndarray, list, tuple)):
        return jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"jax-flash: {name} must be an array; got {type(x).__name__}")
    return x


def _static_count(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or (
            value < 0):
        raise TypeError(f"jax-flash: {name} must be a static int >= 0; got {value!r}")
    return int(value)


def _concrete(x) -> np.ndarray | None:
    """x's values when they are known now (not a tracer under jit, vmap or grad)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)
