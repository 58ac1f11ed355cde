"""flash_attention on sharded inputs, on 8 host CPU devices (see conftest): under jax.jit with
NamedSharding (both partitioners), inside shard_map and inside a pmapped training step. Every
result equals the single-device computation; batch and head shardings compile to programs with
no collectives at all, sequence shardings to ring attention (collective-permutes, no
all-gather), and sequence shardings the ring cannot take are gathered."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flash

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(batch, seqlen, heads, kv_heads, head_dim):
    q = _random((batch, seqlen, heads, head_dim), 0)
    k = _random((batch, seqlen, kv_heads, head_dim), 1)
    v = _random((batch, seqlen, kv_heads, head_dim), 2)
    dout = _random(q.shape, 3)
    dlse = _random((batch, heads, seqlen), 4)
    return q, k, v, dout, dlse


@functools.partial(jax.jit, static_argnames=("causal", "options"))
def _attention_and_grads(q, k, v, dout, dlse, arrays=None, *, causal, options=()):
    """(out, lse, dq, dk, dv) for cotangents (dout, dlse): no reduction of our own, so every
    collective in the compiled program is the attention's. options: static (name, value) pairs
    and arrays {name: array} for flash_attention."""
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                                  **dict(options), **(arrays or {}))
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return (out, lse, *vjp((dout, dlse)))


def _collectives(compiled_text):
    return [name for name in COLLECTIVES if name in compiled_text]


def _check_sharded(mesh, spec, inputs, *, causal, local, kv_spec=None, options=(), arrays=None):
    """Runs with q, k, v, dout sharded by `spec` (k and v by kv_spec if given, dlse by the batch
    and heads part of spec, `arrays` by the batch and sequence part when [batch, seqlen], e.g.
    segment ids, else replicated) and checks the results against the single-device run, and
    the collectives against `local`."""
    arrays = arrays or {}
    expected = _attention_and_grads(*inputs, arrays, causal=causal, options=options)
    batch_axes, seq_axes, head_axes = (tuple(spec) + (None,) * 3)[:3]
    kv_sharding = NamedSharding(mesh, spec if kv_spec is None else kv_spec)
    shardings = [NamedSharding(mesh, spec), kv_sharding, kv_sharding, NamedSharding(mesh, spec),
                 NamedSharding(mesh, P(batch_axes, head_axes))]
    sharded = [jax.device_put(x, s) for x, s in zip(inputs, shardings)]
    sharded.append({name: jax.device_put(x, NamedSharding(
        mesh, P(batch_axes, seq_axes) if x.ndim == 2 else P())) for name, x in arrays.items()})
    compiled = _attention_and_grads.lower(*sharded, causal=causal, options=options).compile()
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), compiled(*sharded), expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5, err_msg=name)
        assert not np.isnan(np.asarray(g)).any(), name  # assert_allclose takes NaN for NaN
    text = compiled.as_text()
    if local:
        assert _collectives(text) == [], f"{spec}: {_collectives(text)}"
    return text


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("spec", [P("x", None, "y"), P(None, None, ("y", "x"))],
                         ids=["batch_x_heads_y", "heads_yx"])
def test_batch_and_head_shardings_run_locally(mesh, spec):
    _check_sharded(mesh, spec, _inputs(8, 33, 8, 8, 16), causal=True, local=True)


def test_gqa_heads_split_with_their_kv_head(mesh):
    # 8 query heads, 4 kv heads: splitting over y (4) leaves each device one group of two.
    _check_sharded(mesh, P("x", None, "y"), _inputs(2, 17, 8, 4, 16), causal=False, local=True)


def test_gqa_heads_gathered_when_kv_heads_do_not_split(mesh):
    # 2 kv heads cannot be split 4 ways: heads are gathered, the batch split stays.
    text = _check_sharded(mesh, P("x", None, "y"), _inputs(2, 17, 8, 2, 16), causal=True,
                          local=False, kv_spec=P("x"))
    assert "all-gather" in text


def _segment_ids(batch, seqlen):
    """Two packed sequences and padding at the end and in the middle of each row."""
    ids = np.zeros((batch, seqlen), np.int32)
    ids[:, seqlen // 3:] = 1
    ids[:, -5:] = -1
    ids[:, 2] = -1
    return jnp.asarray(ids)


def _assert_ring(text):
    assert "collective-permute" in text
    assert "all-gather" not in text and "all-to-all" not in text


@pytest.mark.parametrize("spec,causal,options,segments", [
    (P("y", "x"), True, (), False),
    (P(None, ("y", "x")), False, (("window_size", (3, 1)),), True),
], ids=["causal_batch_y_seq_x", "window_segments_seq_yx"])
def test_sequence_sharding_runs_the_ring(mesh, spec, causal, options, segments):
    # Each device keeps its slice of the sequence; K/V travel, nothing is gathered. Plain and
    # causal attention take the ring without positions, a window or segment ids the one with
    # (here over 8 devices in the order y, x: steps 0, 1 and 7 run, the others are skipped).
    inputs = _inputs(4, 32, 4, 2, 16)
    arrays = {"q_segment_ids": _segment_ids(4, 32)} if segments else None
    _assert_ring(_check_sharded(mesh, spec, inputs, causal=causal, local=False,
                                options=options, arrays=arrays))


def test_sequence_sharding_the_ring_cannot_take_is_gathered(mesh):
    # ALiBi depends on each token's position in its call: the ring does not take it, so the
    # sequence is gathered (slower, never wrong).
    slopes = jnp.linspace(0.1, 0.5, 4, dtype=jnp.float32)
    text = _check_sharded(mesh, P("x", "y"), _inputs(2, 32, 4, 4, 16), causal=True, local=False,
                          arrays={"alibi_slopes": slopes})
    assert "all-gather" in text


@pytest.mark.parametrize("spec", [P("x", None, "y"), P(None, "y", "x")],
                         ids=["batch_heads", "seq_heads"])
def test_gspmd_partitioner(mesh, spec):
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        _attention_and_grads.clear_cache()
        if spec == P("x", None, "y"):
            _check_sharded(mesh, spec, _inputs(2, 17, 4, 4, 16), causal=True, local=True)
        else:  # the sequence over y as a ring, heads over x, softcap in every step
            options = (("window_size", (-1, 5)), ("softcap", 3.0))
            _assert_ring(_check_sharded(mesh, spec, _inputs(2, 32, 4, 2, 16), causal=False,
                                        local=False, options=options))
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
        _attention_and_grads.clear_cache()


def test_inside_shard_map(mesh):
    inputs = _inputs(4, 17, 8, 4, 16)
    expected = _attention_and_grads(*inputs, causal=True)
    spec = P("x", None, "y")
    local = jax.jit(jax.shard_map(
        functools.partial(_attention_and_grads, causal=True), mesh=mesh,
        in_specs=(spec,) * 4 + (P("x", "y"),), out_specs=(spec, P("x", "y"), spec, spec, spec)))
    compiled = local.lower(*inputs).compile()
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), compiled(*inputs), expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5, err_msg=name)
    assert _collectives(compiled.as_text()) == []


def _loss(params, x):
    """A one-layer attention model: x [b, s, model] -> q, k, v -> attention -> mean square."""
    batch, seqlen, _ = x.shape
    q, k, v = (jnp.einsum("bsm,mhd->bshd", x, params[name]) for name in ("wq", "wk", "wv"))
    out = jax_flash.flash_attention(q, k, v, causal=True)
    return jnp.mean(out.reshape(batch, seqlen, -1) ** 2)


def test_pmap_data_parallel_training_step():
    devices = jax.devices()
    shards, model, heads, kv_heads, head_dim = len(devices), 12, 4, 2, 8
    params = {"wq": _random((model, heads, head_dim), 5),
              "wk": _random((model, kv_heads, head_dim), 6),
              "wv": _random((model, kv_heads, head_dim), 7)}
    x = _random((shards, 2, 19, model), 8)  # per device: batch 2, seqlen 19

    @functools.partial(jax.pmap, axis_name="data")
    def train_step(params, x):
        loss, grads = jax.value_and_grad(_loss)(params, x)
        grads = jax.lax.pmean(grads, "data")
        return jax.lax.pmean(loss, "data"), jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (shards, *p.shape)), params)
    loss, new_params = train_step(replicated, x)

    whole = x.reshape(-1, *x.shape[2:])  # the same examples as one batch on one device
    want_loss, want_grads = jax.jit(jax.value_and_grad(_loss))(params, whole)
    np.testing.assert_allclose(loss, np.full(shards, want_loss), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(new_params[name],
                                   np.broadcast_to(params[name] - 0.1 * want_grads[name],
                                                   new_params[name].shape),
                                   atol=1e-6, rtol=1e-5, err_msg=name)
