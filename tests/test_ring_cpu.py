"""ring_attention inside shard_map on host CPU devices (see conftest), against flash_attention on
the whole sequence: out, lse and the gradients, for non-causal, causal contiguous and causal
zigzag layouts with grouped-query heads, sliding windows (alone, with causal, one-sided, reaching
no, some or every other slice) and segment ids with padding and segments across slice
boundaries; the compiled program passes K/V around the ring and never gathers them, and steps no
query can see make no attention call and no hop. Also the zigzag helpers and ring_attention's
input checks."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jax_flash
from jax_flash import _ring
from jax_flash._config import FlashConfig


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _vjp_outputs(attention, q, k, v, dout, dlse, q_ids=None, kv_ids=None):
    if q_ids is not None:
        attention = functools.partial(attention, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return (out, lse, *vjp((dout, dlse)))


def _segment_ids(batch, seqlen):
    """Three packed sequences, each across a slice boundary when the ring has 2 or 4 devices, a
    padding token inside the first and padding at the end."""
    ids = np.zeros((batch, seqlen), np.int32)
    ids[:, seqlen // 3:] = 1
    ids[:, 2 * seqlen // 3:] = 2
    ids[:, 3] = -1
    ids[:, -3:] = -1
    return jnp.asarray(ids)


def _check_ring(num_devices, local_seqlen, *, layout="contiguous", segments=False,
                local_seqlen_k=None, **options):
    """ring_attention with `options` on num_devices slices of local_seqlen tokens (of keys:
    local_seqlen_k) against flash_attention on the whole sequence: out, lse, dq, dk, dv, with
    no NaN anywhere. Returns the compiled program's text."""
    batch, heads, kv_heads, head_dim = 2, 4, 2, 16
    seqlen_q = local_seqlen * num_devices
    seqlen_k = (local_seqlen_k or local_seqlen) * num_devices
    q = _random((batch, seqlen_q, heads, head_dim), 0)
    k = _random((batch, seqlen_k, kv_heads, head_dim), 1)
    v = _random((batch, seqlen_k, kv_heads, head_dim), 2)
    dout = _random(q.shape, 3)
    dlse = _random((batch, heads, seqlen_q), 4)
    ids = (_segment_ids(batch, seqlen_q), _segment_ids(batch, seqlen_k)) if segments else ()
    whole = functools.partial(jax_flash.flash_attention, return_lse=True, **options)
    expected = jax.jit(functools.partial(_vjp_outputs, whole))(q, k, v, dout, dlse, *ids)

    ring = functools.partial(jax_flash.ring_attention, axis_name="seq", layout=layout,
                             return_lse=True, **options)
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:num_devices])
    seq, lse_seq = P(None, "seq"), P(None, None, "seq")
    sharded = jax.jit(jax.shard_map(
        functools.partial(_vjp_outputs, ring), mesh=mesh,
        in_specs=(seq,) * 4 + (lse_seq,) + (seq,) * len(ids),
        out_specs=(seq, lse_seq, seq, seq, seq)))
    if layout == "zigzag":
        to, back = (functools.partial(f, num_shards=num_devices)
                    for f in (jax_flash.to_zigzag, jax_flash.from_zigzag))
    else:
        to = back = lambda x, axis=1: x
    inputs = (to(q), to(k), to(v), to(dout), to(dlse, axis=2), *(to(x) for x in ids))
    compiled = sharded.lower(*inputs).compile()
    out, lse, dq, dk, dv = compiled(*inputs)
    got = (back(out), back(lse, axis=2), back(dq), back(dk), back(dv))
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(g, e, atol=3e-5, rtol=3e-5, err_msg=name)
        # assert_allclose takes NaN for NaN; padding must give 0 (lse -inf), never NaN.
        assert not np.isnan(np.asarray(g)).any(), name
    text = compiled.as_text()
    assert "all-gather" not in text and "all-to-all" not in text
    return text


@pytest.mark.parametrize("causal,layout,num_devices", [
    (False, "contiguous", 2), (True, "contiguous", 2), (True, "zigzag", 4)])
def test_ring_matches_whole_sequence(causal, layout, num_devices):
    text = _check_ring(num_devices, 12, causal=causal, layout=layout)
    assert "collective-permute" in text


# Slices of 8 tokens (zigzag: chunks of 4). Small windows leave steps out (causal (3, -1) on 4
# devices runs steps 0 and 1; (1, 1) runs 0, 1 and 3, the slices hopping 2 places in between),
# others cut inside a neighbouring slice or chunk; each with causal or not, both layouts and
# segment ids. (test_sharding_cpu runs contiguous windows without causal, right-only too.)
@pytest.mark.parametrize("num_devices,layout,options,segments", [
    (4, "contiguous", dict(causal=True, window_size=(3, -1)), False),
    (4, "zigzag", dict(window_size=(1, 1)), True),
    (2, "zigzag", dict(causal=True, window_size=(6, -1)), True),
    (2, "zigzag", dict(causal=True), True),
], ids=["causal-left3-4dev", "window1-zigzag-segments-4dev", "causal-left6-zigzag-segments",
        "causal-zigzag-segments"])
def test_ring_window_and_segments_match_whole_sequence(num_devices, layout, options, segments):
    text = _check_ring(num_devices, 8, layout=layout, segments=segments, **options)
    assert "collective-permute" in text


def test_ring_segments_with_unequal_slices():
    # Without a band, q and k slices may differ in length; the kv ids travel with k and v.
    assert "collective-permute" in _check_ring(2, 6, local_seqlen_k=10, segments=True)


def _brute_force_steps(num_devices, length, layout, causal, window):
    """The steps at which some query sees some key, from every token's global position."""
    seqlen = num_devices * length
    order = np.arange(seqlen)
    if layout == "zigzag":
        order = np.asarray(jax_flash.to_zigzag(order, num_devices, axis=0))
    slices = order.reshape(num_devices, length)
    left, right = window
    steps = []
    for step in range(num_devices):
        for device in range(num_devices):
            offset = slices[(device - step) % num_devices][None, :] - slices[device][:, None]
            seen = np.ones(offset.shape, bool)
            if left != -1:
                seen &= offset >= -left
            if right != -1 or causal:
                seen &= offset <= (0 if causal else right)
            if seen.any():
                steps.append(step)
                break
    return tuple(steps)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_static_steps_are_those_some_query_sees(layout):
    for num_devices, length in ((2, 8), (4, 8), (8, 4)):
        for causal in (False, True):
            for window in ((-1, -1), (0, 0), (1, 1), (3, -1), (-1, 2), (2, 9), (9, 9)):
                config = FlashConfig(causal=causal, softmax_scale=1.0, implementation=None,
                                     window_size=window)
                ring = _ring._Ring.of(config, "seq", (num_devices,), ("seq",), layout, length)
                assert ring.steps == _brute_force_steps(num_devices, length, layout, causal,
                                                        window), (num_devices, causal, window)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_positions_suit_the_kernels_ranges(layout):
    # Each device's global positions are its tokens' places in the whole sequence, in local
    # order non-decreasing; a segment contiguous in the whole sequence is contiguous in every
    # slice too. Both are what the kernels' ranges need to be exact (see _kernel_ranges).
    num_devices, length = 4, 8
    config = FlashConfig(causal=True, softmax_scale=1.0, implementation=None,
                         window_size=(3, -1))
    ring = _ring._Ring.of(config, "seq", (num_devices,), ("seq",), layout, length)
    x = jnp.zeros((2, length, 1, 1))
    positions = np.concatenate([ring.positions(device, x) for device in range(num_devices)], 1)
    order = np.arange(num_devices * length)
    if layout == "zigzag":
        order = np.asarray(jax_flash.to_zigzag(order, num_devices, axis=0))
    np.testing.assert_array_equal(positions, np.broadcast_to(order, positions.shape))
    slices = positions[0].reshape(num_devices, length)
    assert (np.diff(slices, axis=1) >= 0).all()
    ids = np.repeat(np.arange(5), [3, 9, 1, 12, 7])  # runs across slice and chunk boundaries
    for local in ids[slices]:
        runs = local[np.r_[True, local[1:] != local[:-1]]]
        assert len(runs) == len(set(runs)), local


def _count(jaxpr, names):
    """How many equations of a jaxpr (sub-jaxprs included) bind each primitive in `names`."""
    counts = dict.fromkeys(names, 0)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in counts:
            counts[eqn.primitive.name] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            for name, count in _count(sub, names).items():
                counts[name] += count
    return counts


@pytest.mark.parametrize("window,steps", [((0, 0), 1), ((2, -1), 2), ((9, 9), 7), ((-1, -1), 8)])
def test_small_windows_shrink_the_ring(window, steps):
    # 8 devices, slices of 4 tokens, with segment ids: a window that reaches no other slice
    # runs step 0 alone; causal with 2 keys back reaches the slice before only; (9, 9) reaches
    # 3 slices either way and skips the one opposite (step 4). Each step runs one forward and
    # one backward call; each hop moves k, v and the kv ids forward and in the backward k, v,
    # ids, dk and dv, and one more hop takes dk and dv home.
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
    ring = functools.partial(jax_flash.ring_attention, axis_name="seq",
                             causal=window == (2, -1), window_size=window)
    x = _random((1, 32, 2, 16), 10)
    ids = jnp.zeros((1, 32), jnp.int32)

    def loss(q, k, v, ids):
        return jnp.sum(ring(q, k, v, q_segment_ids=ids) ** 2)

    fn = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=P(None, "seq"),
                       out_specs=P(None, "seq"), check_vma=False)
    counts = _count(jax.make_jaxpr(fn)(x, x, x, ids).jaxpr,
                    ("jax_flash_fwd", "jax_flash_bwd", "ppermute", "cond"))
    hops = steps - 1
    assert counts == {"jax_flash_fwd": steps, "jax_flash_bwd": steps,
                      "ppermute": 3 * hops + 5 * hops + 2 * (steps > 1), "cond": 0}, counts


def test_zigzag_layout_and_round_trip():
    tokens = jnp.arange(2 * 16).reshape(2, 16)
    zigzag = jax_flash.to_zigzag(tokens, 4)
    # Device i of 4 holds chunks i and 7 - i of 8 chunks of 2 tokens.
    np.testing.assert_array_equal(zigzag[0], [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11,
                                              6, 7, 8, 9])
    np.testing.assert_array_equal(jax_flash.from_zigzag(zigzag, 4), tokens)
    x = _random((3, 5, 12), 5)
    np.testing.assert_array_equal(
        jax_flash.from_zigzag(jax_flash.to_zigzag(x, 3, axis=-1), 3, axis=-1), x)


def test_zigzag_rejects_uneven_sequence():
    with pytest.raises(ValueError, match=r"length 10.*2 \* num_shards = 4"):
        jax_flash.to_zigzag(jnp.zeros((1, 10)), 2)


def test_ring_needs_its_axis():
    q = _random((1, 8, 2, 16), 6)
    with pytest.raises(NameError, match="shard_map.*'seq'"):
        jax_flash.ring_attention(q, q, q, axis_name="seq")


def test_ring_rejects_bad_options():
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:2])
    q, k = _random((1, 8, 2, 16), 7), _random((1, 12, 2, 16), 8)

    def run(q, k, **options):
        return jax.shard_map(functools.partial(jax_flash.ring_attention, axis_name="seq",
                                               **options),
                             mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))(q, k, k)

    with pytest.raises(ValueError, match="one length"):
        run(q, k, causal=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        run(q, q, layout="striped")
    with pytest.raises(ValueError, match="seqlen must be even"):
        run(_random((1, 6, 2, 16), 9), _random((1, 6, 2, 16), 9), causal=True, layout="zigzag")
    with pytest.raises(ValueError, match=r"window_size=\(2, 2\) ring attention needs q and k "
                       r"slices of one length.*q \(1, 4, 2, 16\), k \(1, 6, 2, 16\)"):
        run(q, k, window_size=(2, 2))
    with pytest.raises(ValueError, match="window_size entries must be >= 0"):
        run(q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"seqlen must be even; got q \(1, 3, 2, 16\)"):
        run(_random((1, 6, 2, 16), 9), _random((1, 6, 2, 16), 9), window_size=(1, 1),
            layout="zigzag")
    with pytest.raises(ValueError, match=r"q_segment_ids must be \[batch, seqlen_q\] = "
                                         r"\[1, 4\].*got int32\[1, 6\]"):
        run(q, q, q_segment_ids=jnp.zeros((1, 6), jnp.int32))
