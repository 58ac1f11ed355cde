"""The sharding rules and ring attention on the CUDA kernels, on 2 or more GPUs: the CPU tests'
checks (test_sharding_cpu, test_ring_cpu) with bfloat16 inputs and implementation="cuda", ring
attention with a window and segment ids included (in shard_map and from a sequence-sharded
jax.jit)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flash

pytestmark = pytest.mark.gpu

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _gpus():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


@pytest.fixture
def two_gpus():
    if len(_gpus()) < 2:
        pytest.skip("needs at least 2 CUDA GPUs")
    return _gpus()[:2]


def _random(shape, seed, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _vjp_outputs(attention, q, k, v, dout, dlse, q_ids=None):
    if q_ids is not None:
        attention = functools.partial(attention, q_segment_ids=q_ids)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return (out, lse, *vjp((dout, dlse)))


def _assert_close(got, expected):
    """Within 2% of each result's largest finite entry; -inf (the lse of padding) exactly where
    expected, and no NaN."""
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        finite = np.isfinite(e)
        np.testing.assert_array_equal(g[~finite], e[~finite], err_msg=name)
        np.testing.assert_allclose(g[finite], e[finite], atol=2e-2 * np.abs(e[finite]).max(),
                                   err_msg=name)


@pytest.mark.parametrize("spec", [P("d"), P(None, None, "d")], ids=["batch", "heads"])
def test_kernel_sharded_over_batch_or_heads_runs_locally(two_gpus, spec):
    q = _random((2, 1024, 8, 128), 0)
    k, v = _random((2, 1024, 4, 128), 1), _random((2, 1024, 4, 128), 2)
    dout, dlse = _random(q.shape, 3), _random((2, 8, 1024), 4, jnp.float32)
    attention = functools.partial(jax_flash.flash_attention, causal=True, return_lse=True,
                                  implementation="cuda")
    fn = jax.jit(functools.partial(_vjp_outputs, attention))
    with jax.default_device(two_gpus[0]):
        expected = fn(q, k, v, dout, dlse)
    mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,), devices=two_gpus)
    lse_spec = P(spec[0] if len(spec) else None, spec[2] if len(spec) > 2 else None)
    shardings = [NamedSharding(mesh, spec)] * 4 + [NamedSharding(mesh, lse_spec)]
    sharded = [jax.device_put(x, s) for x, s in zip((q, k, v, dout, dlse), shardings)]
    compiled = fn.lower(*sharded).compile()
    _assert_close(compiled(*sharded), expected)
    text = compiled.as_text()
    assert [c for c in COLLECTIVES if c in text] == []
    assert "jax_flash_fwd" in text and "jax_flash_bwd" in text


def _check_ring_matches_one_gpu(gpus, layout, options, seqlen, seed, ids=None):
    """ring_attention in shard_map over 2 GPUs (the sequence split) against flash_attention on one:
    out, lse and the gradients agree; the compiled ring permutes K/V and gathers nothing."""
    q = _random((1, seqlen, 8, 128), seed)
    k, v = _random((1, seqlen, 2, 128), seed + 1), _random((1, seqlen, 2, 128), seed + 2)
    dout, dlse = _random(q.shape, seed + 3), _random((1, 8, seqlen), seed + 4, jnp.float32)
    extra = () if ids is None else (ids,)
    options = dict(options, return_lse=True, implementation="cuda")
    whole = functools.partial(jax_flash.flash_attention, **options)
    with jax.default_device(gpus[0]):
        expected = jax.jit(functools.partial(_vjp_outputs, whole))(q, k, v, dout, dlse, *extra)

    ring = functools.partial(jax_flash.ring_attention, axis_name="seq", layout=layout, **options)
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,), devices=gpus)
    seq, lse_seq = P(None, "seq"), P(None, None, "seq")
    fn = jax.jit(jax.shard_map(functools.partial(_vjp_outputs, ring), mesh=mesh,
                               in_specs=(seq,) * 4 + (lse_seq,) + (seq,) * len(extra),
                               out_specs=(seq, lse_seq, seq, seq, seq)))
    if layout == "zigzag":
        to, back = (functools.partial(f, num_shards=2)
                    for f in (jax_flash.to_zigzag, jax_flash.from_zigzag))
    else:
        to = back = lambda x, axis=1: x
    inputs = (to(q), to(k), to(v), to(dout), to(dlse, axis=2), *(to(x) for x in extra))
    compiled = fn.lower(*inputs).compile()
    out, lse, dq, dk, dv = compiled(*inputs)
    _assert_close((back(out), back(lse, axis=2), back(dq), back(dk), back(dv)), expected)
    text = compiled.as_text()
    assert "collective-permute" in text and "all-gather" not in text
    assert "jax_flash_fwd" in text and "jax_flash_bwd" in text


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_kernel_ring_attention_matches_one_gpu(two_gpus, layout):
    _check_ring_matches_one_gpu(two_gpus, layout, dict(causal=True), seqlen=2048, seed=5)


def _segment_ids(batch, seqlen):
    """Two packed sequences, the second across the middle of the row (the boundary of 2 slices),
    and padding inside the first (which makes it non-contiguous) and at the end."""
    ids = np.zeros((batch, seqlen), np.int32)
    ids[:, seqlen // 3:] = 1
    ids[:, 5] = -1
    ids[:, -100:] = -1
    return jnp.asarray(ids)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_kernel_ring_window_and_segments_match_one_gpu(two_gpus, layout):
    # A causal window that reaches into the other device's slice, and packed sequences whose kv
    # ids travel with k and v: every step is a kernel call on global positions.
    _check_ring_matches_one_gpu(two_gpus, layout, dict(causal=True, window_size=(300, -1)),
                                seqlen=1024, seed=10, ids=_segment_ids(1, 1024))


@pytest.mark.parametrize("options,segments", [
    (dict(causal=True), False),
    (dict(causal=True, window_size=(300, -1)), True),
], ids=["causal", "causal-window-segments"])
def test_kernel_sequence_sharded_jit_runs_the_ring(two_gpus, options, segments):
    # Plain jit, the sequence split over 2 GPUs: the partition rule runs the ring on the kernels.
    q = _random((1, 2048, 8, 128), 15)
    k, v = _random((1, 2048, 2, 128), 16), _random((1, 2048, 2, 128), 17)
    dout, dlse = _random(q.shape, 18), _random((1, 8, 2048), 19, jnp.float32)
    ids = (_segment_ids(1, 2048),) if segments else ()
    attention = functools.partial(jax_flash.flash_attention, return_lse=True,
                                  implementation="cuda", **options)
    fn = jax.jit(functools.partial(_vjp_outputs, attention))
    with jax.default_device(two_gpus[0]):
        expected = fn(q, k, v, dout, dlse, *ids)
    mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,), devices=two_gpus)
    shardings = ([NamedSharding(mesh, P(None, "d"))] * 4 + [NamedSharding(mesh, P(None, None, "d"))]
                 + [NamedSharding(mesh, P(None, "d"))] * len(ids))
    sharded = [jax.device_put(x, s) for x, s in zip((q, k, v, dout, dlse, *ids), shardings)]
    compiled = fn.lower(*sharded).compile()
    _assert_close(compiled(*sharded), expected)
    text = compiled.as_text()
    assert "collective-permute" in text and "all-gather" not in text
    assert "jax_flash_fwd" in text and "jax_flash_bwd" in text
