"""ring_attention inside shard_map on host CPU devices (see conftest), against flash_attention on
the whole sequence: out, lse and the gradients, for non-causal, causal contiguous and causal
zigzag layouts with grouped-query heads; the compiled program passes K/V around the ring and
never gathers them. Also the zigzag helpers and ring_attention's input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jax_flash


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _vjp_outputs(attention, q, k, v, dout, dlse):
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return (out, lse, *vjp((dout, dlse)))


@pytest.mark.parametrize("causal,layout,num_devices", [
    (False, "contiguous", 2), (True, "contiguous", 2), (True, "zigzag", 4)])
def test_ring_matches_whole_sequence(causal, layout, num_devices):
    batch, seqlen, heads, kv_heads, head_dim = 2, 12 * num_devices, 4, 2, 16
    q = _random((batch, seqlen, heads, head_dim), 0)
    k = _random((batch, seqlen, kv_heads, head_dim), 1)
    v = _random((batch, seqlen, kv_heads, head_dim), 2)
    dout = _random(q.shape, 3)
    dlse = _random((batch, heads, seqlen), 4)
    whole = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True)
    expected = jax.jit(functools.partial(_vjp_outputs, whole))(q, k, v, dout, dlse)

    ring = functools.partial(jax_flash.ring_attention, axis_name="seq", causal=causal,
                             layout=layout, return_lse=True)
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:num_devices])
    seq, lse_seq = P(None, "seq"), P(None, None, "seq")
    sharded = jax.jit(jax.shard_map(
        functools.partial(_vjp_outputs, ring), mesh=mesh, in_specs=(seq,) * 4 + (lse_seq,),
        out_specs=(seq, lse_seq, seq, seq, seq)))
    if layout == "zigzag":
        to, back = (functools.partial(f, num_shards=num_devices)
                    for f in (jax_flash.to_zigzag, jax_flash.from_zigzag))
    else:
        to = back = lambda x, axis=1: x
    inputs = (to(q), to(k), to(v), to(dout), to(dlse, axis=2))
    compiled = sharded.lower(*inputs).compile()
    out, lse, dq, dk, dv = compiled(*inputs)
    got = (back(out), back(lse, axis=2), back(dq), back(dk), back(dv))
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(g, e, atol=3e-5, rtol=3e-5, err_msg=name)

    text = compiled.as_text()
    assert "collective-permute" in text
    assert "all-gather" not in text and "all-to-all" not in text


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
