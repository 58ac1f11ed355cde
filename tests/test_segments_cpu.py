"""Segment ids on the XLA path: flash_attention(q_segment_ids=, kv_segment_ids=) against dense
float32 attention run on each segment alone, forward and gradients; padding; every feature
within segments; vmap, sharding, the cu_seqlens helpers and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_flash
from grad_oracle import random_normal
from jax_flash._dropout import dense_keep_mask

ATOL = RTOL = 2e-5


def _ids(*rows):
    """int32 [batch, seqlen] from rows of (segment id, length) runs."""
    return jnp.asarray([np.concatenate([np.full(n, i) for i, n in row]) for row in rows],
                       jnp.int32)


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim):
    q = random_normal(seed, (batch, seqlen_q, heads, head_dim), jnp.float32)
    k = random_normal(seed + 1, (batch, seqlen_k, kv_heads, head_dim), jnp.float32)
    v = random_normal(seed + 2, (batch, seqlen_k, kv_heads, head_dim), jnp.float32)
    dout = random_normal(seed + 3, q.shape, jnp.float32)
    dlse = random_normal(seed + 4, (batch, heads, seqlen_q), jnp.float32)
    return q, k, v, dout, dlse


@functools.partial(jax.jit, static_argnames=("options",))
def _padded_oracle(q, k, v, key_valid, dout, dlse, arrays, options):
    def attention(q, k, v):
        return jax_flash.attention_reference(q, k, v, mask=key_valid, **arrays, **dict(options))

    outputs, vjp = jax.vjp(attention, q, k, v)
    return (*outputs, *vjp((dout, dlse)))


def per_sequence_oracle(pieces, **options):
    """Dense float32 attention on each sequence alone: pieces are (q [lq, h, d], k [lk, hk, d],
    v, dout [lq, h, d], dlse [h, lq]) with lk >= 1; returns (out, lse, dq, dk, dv) of each.

    One call for all: each sequence is padded at the front to the longest, which keeps the
    bottom-right alignment of causal, window and ALiBi, and a mask hides the padded keys."""
    longest_q = max(p[0].shape[0] for p in pieces)
    longest_k = max(p[1].shape[0] for p in pieces)

    def front_pad(x, length, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (length - x.shape[axis], 0)
        return jnp.pad(x, pad)

    q, k, v, dout, dlse = (
        jnp.stack([front_pad(p[i], longest_k if i in (1, 2) else longest_q, 1 if i == 4 else 0)
                   for p in pieces]) for i in range(5))
    key_valid = jnp.stack([jnp.arange(longest_k) >= longest_k - p[1].shape[0] for p in pieces])
    arrays = {name: x for name, x in options.items() if isinstance(x, (np.ndarray, jax.Array))}
    static = tuple(sorted((name, x) for name, x in options.items() if name not in arrays))
    results = _padded_oracle(q, k, v, key_valid[:, None, None, :], dout, dlse, arrays, static)
    return [tuple(x[i, ..., -length:, :, :] if x.ndim == 4 else x[i, :, -length:]
                  for x, length in zip(results, (lq, lq, lq, lk, lk)))
            for i, (lq, lk) in enumerate((p[0].shape[0], p[1].shape[0]) for p in pieces)]


def _runs(row):
    """[(id, start, stop)] of the maximal runs of equal ids in one row."""
    row = np.asarray(row)
    edges = [0, *np.flatnonzero(np.diff(row)) + 1, len(row)]
    return [(row[a], a, b) for a, b in zip(edges[:-1], edges[1:])]


def test_each_segment_attends_alone_and_padding_gives_zero():
    """150 tokens cross the default 128-token tile; a single-token segment, a segment over the
    tile boundary and trailing padding; causal with grouped-query heads."""
    ids = _ids([(7, 1), (0, 70), (3, 60), (-1, 19)], [(2, 64), (-5, 3), (4, 83)])
    q, k, v, dout, dlse = _inputs(0, 2, 150, 150, 4, 2, 8)
    attention = functools.partial(jax_flash.flash_attention, causal=True, return_lse=True,
                                  q_segment_ids=ids)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    flash = (out, lse.transpose(0, 2, 1), *vjp((dout, dlse)))  # lse: [b, sq, h] like the rest
    segments = [(b, slice(start, stop)) for b in range(2)
                for segment, start, stop in _runs(ids[b]) if segment >= 0]
    oracle = per_sequence_oracle(
        [(q[b, rows], k[b, rows], v[b, rows], dout[b, rows], dlse[b, :, rows])
         for b, rows in segments], causal=True)
    for (b, rows), expected in zip(segments, oracle):
        expected = (expected[0], expected[1].T, *expected[2:])
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), flash, expected):
            np.testing.assert_allclose(got[b, rows], want, atol=ATOL, rtol=RTOL, err_msg=name)
    padding = ids < 0  # sees nothing and sends nothing back
    assert np.isneginf(lse.transpose(0, 2, 1)[padding]).all()
    for name, x in zip(("out", "dq", "dk", "dv"), (flash[0], *flash[2:])):
        assert (x[padding] == 0).all(), name


def test_every_feature_applies_within_segments():
    """seqlen_q != seqlen_k with their own ids, against the dense oracle given the segments as
    a mask: window, softcap, ALiBi, bias, sinks and dropout, with causal and GQA; out, lse and
    the gradients of q, k, v, bias, alibi_slopes and sinks."""
    batch, seqlen_q, seqlen_k, heads = 2, 13, 21, 4
    q, k, v, dout, dlse = _inputs(10, batch, seqlen_q, seqlen_k, heads, 2, 8)
    q_ids = _ids([(0, 5), (1, 6), (-1, 2)], [(3, 13)])
    kv_ids = _ids([(0, 9), (1, 10), (-1, 2)], [(3, 4), (9, 17)])
    segment_mask = ((q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids >= 0)[:, :, None])[:, None]
    rng = jax.random.key(3)
    tensors = {"bias": random_normal(11, (heads, seqlen_q, seqlen_k), jnp.float32),
               "alibi_slopes": jnp.linspace(0.1, 0.4, heads, dtype=jnp.float32),
               "sinks": random_normal(12, (heads,), jnp.float32)}
    options = {"causal": True, "window_size": (6, 2), "softcap": 3.0, "dropout_rate": 0.25}
    keep = dense_keep_mask(rng, 0.25, batch=batch, heads=heads, seqlen_q=seqlen_q,
                           seqlen_k=seqlen_k)

    def flash(q, k, v, bias, alibi_slopes, sinks):
        return jax_flash.flash_attention(
            q, k, v, bias=bias, alibi_slopes=alibi_slopes, sinks=sinks, dropout_rng=rng,
            q_segment_ids=q_ids, kv_segment_ids=kv_ids, return_lse=True, **options)

    def oracle(q, k, v, bias, alibi_slopes, sinks):
        return jax_flash.attention_reference(
            q, k, v, bias=bias, alibi_slopes=alibi_slopes, sinks=sinks, mask=segment_mask,
            dropout_keep=keep, **options)

    @jax.jit
    def outputs_and_grads(args):
        results = []
        for attention in (flash, oracle):
            outputs, vjp = jax.vjp(attention, *args)
            results.append((*outputs, *vjp((dout, dlse))))
        return results

    args = (q, k, v, tensors["bias"], tensors["alibi_slopes"], tensors["sinks"])
    names = ("out", "lse", "dq", "dk", "dv", "dbias", "dalibi_slopes", "dsinks")
    for name, got, want in zip(names, *outputs_and_grads(args)):
        assert not np.isnan(got).any(), name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_check_grads():
    q, k, v, _, _ = _inputs(20, 1, 9, 9, 2, 1, 8)
    ids = _ids([(0, 1), (1, 5), (2, 3)])
    f = functools.partial(jax_flash.flash_attention, causal=True, q_segment_ids=ids)
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_vmap_any_in_axes_and_jit():
    """A mapped axis in the middle of q and of the ids, and ids shared by the mapped calls."""
    q, k, v, _, _ = _inputs(30, 3, 11, 11, 2, 2, 8)  # q: [mapped 3, seqlen, heads, d]
    ids = _ids([(0, 4), (1, 7)], [(0, 11)], [(2, 2), (-1, 9)])  # [mapped 3, seqlen]

    def attention(q, k, v, ids):
        return jax_flash.flash_attention(q, k, v, causal=True, q_segment_ids=ids)

    one = lambda i, x: x[i:i + 1]  # noqa: E731
    expected = jnp.concatenate([attention(one(i, q), one(i, k), one(i, v), one(i, ids))
                                for i in range(3)])
    mapped = jax.jit(jax.vmap(attention, in_axes=2, out_axes=1))(
        *(jnp.moveaxis(x[:, None], 0, 2) for x in (q, k, v, ids)))
    np.testing.assert_allclose(mapped[0], expected, atol=ATOL, rtol=RTOL)
    shared = jax.vmap(attention, in_axes=(0, 0, 0, None))(q[:, None], k[:, None], v[:, None],
                                                          ids[:1])
    np.testing.assert_allclose(shared[0], attention(q[:1], k[:1], v[:1], ids[:1]),
                               atol=ATOL, rtol=RTOL)


def test_batch_and_head_sharded_run_locally():
    mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    q, k, v, _, _ = _inputs(40, 2, 16, 16, 4, 2, 8)
    ids = _ids([(0, 9), (1, 7)], [(3, 3), (-1, 13)])
    attention = jax.jit(functools.partial(jax_flash.flash_attention, causal=True))
    expected = attention(q, k, v, q_segment_ids=ids)
    qkv = [jax.device_put(x, NamedSharding(mesh, P("x", None, "y"))) for x in (q, k, v)]
    sharded_ids = jax.device_put(ids, NamedSharding(mesh, P("x")))
    compiled = attention.lower(*qkv, q_segment_ids=sharded_ids).compile()
    np.testing.assert_allclose(compiled(*qkv, q_segment_ids=sharded_ids), expected,
                               atol=ATOL, rtol=RTOL)
    text = compiled.as_text()
    assert not any(c in text for c in ("all-gather", "all-reduce", "all-to-all"))


# ---- the cu_seqlens helpers ------------------------------------------------------------------

def test_helpers_round_trip_under_jit_and_vmap():
    cu_seqlens = jnp.asarray([0, 3, 3, 4, 9])  # an empty sequence, a single token
    ids = jax.jit(jax_flash.cu_seqlens_to_segment_ids, static_argnums=1)(cu_seqlens, 11)
    np.testing.assert_array_equal(ids, [0, 0, 0, 2, 3, 3, 3, 3, 3, -1, -1])
    to_cu = jax.jit(jax_flash.segment_ids_to_cu_seqlens, static_argnums=1)
    # Runs, not ids, make sequences; the empty one moves to the end; padding is left out.
    np.testing.assert_array_equal(to_cu(ids, 5), [0, 3, 4, 9, 9, 9])
    rows = jnp.asarray([[5, 5, 1, 1, 1, 5], [0, 0, 0, 0, -1, -1]])
    np.testing.assert_array_equal(jax.vmap(to_cu, in_axes=(0, None))(rows, 3),
                                  [[0, 2, 5, 6], [0, 4, 4, 4]])


def test_helpers_reject_bad_values():
    with pytest.raises(ValueError, match="more than max_segments = 2"):
        jax_flash.segment_ids_to_cu_seqlens(jnp.asarray([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="padding .* at token 1 comes before a segment"):
        jax_flash.segment_ids_to_cu_seqlens(jnp.asarray([0, -1, 2]), 4)
    with pytest.raises(ValueError, match=r"one row of integer segment ids \[seqlen\]"):
        jax_flash.segment_ids_to_cu_seqlens(jnp.zeros((2, 3), jnp.int32), 4)
    with pytest.raises(ValueError, match="never decrease"):
        jax_flash.cu_seqlens_to_segment_ids(jnp.asarray([0, 4, 2]), 5)
    with pytest.raises(ValueError, match="must equal the number of packed tokens, 5"):
        jax_flash.cu_seqlens_to_segment_ids(jnp.asarray([0, 4, 7]), 5)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer array"):
        jax_flash.cu_seqlens_to_segment_ids(jnp.asarray([0.0, 4.0]), 5)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("q_ids, kv_ids, error, match", [
    (np.zeros((2, 7), np.int32), None, ValueError,
     r"q_segment_ids must be \[batch, seqlen_q\] = \[2, 5\] .* got int32\[2, 7\]"),
    (np.zeros((2, 5), np.float32), None, TypeError, r"q_segment_ids must be an integer array"),
    (np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int32), ValueError,
     r"kv_segment_ids must be \[batch, seqlen_k\] = \[2, 6\] .* got int32\[2, 5\]"),
    (np.zeros((2, 5), np.int32), None, ValueError,
     "defaults to q_segment_ids only when seqlen_q == seqlen_k"),
    (None, np.zeros((2, 6), np.int32), ValueError, "kv_segment_ids needs q_segment_ids"),
])
def test_bad_segment_ids(q_ids, kv_ids, error, match):
    q, k, v, _, _ = _inputs(50, 2, 5, 6, 2, 2, 8)
    with pytest.raises(error, match=match):
        jax_flash.flash_attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids)


def test_cuda_implementation_names_only_what_the_kernels_lack():
    """The kernels run segment ids, ALiBi, bias and dropout; combined with softcap, only the
    bias with softcap is named."""
    q, k, v, _, _ = _inputs(60, 1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="cannot run bias with softcap: "):
        jax_flash.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                  alibi_slopes=jnp.ones((2,)), bias=jnp.ones((4,)), softcap=5.0,
                                  dropout_rate=0.1, dropout_rng=jax.random.key(0),
                                  implementation="cuda",
                                  q_segment_ids=jnp.zeros((1, 4), int))
