"""flash_attention on sharded inputs, on 8 host CPU devices (see conftest): under jax.jit with
NamedSharding (both partitioners), inside shard_map and inside a pmapped training step. Every
result equals the single-device computation; batch and head shardings compile to programs with
no collectives at all."""

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


@functools.partial(jax.jit, static_argnames="causal")
def _attention_and_grads(q, k, v, dout, dlse, *, causal):
    """(out, lse, dq, dk, dv) for cotangents (dout, dlse): no reduction of our own, so every
    collective in the compiled program is the attention's."""
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return (out, lse, *vjp((dout, dlse)))


def _collectives(compiled_text):
    return [name for name in COLLECTIVES if name in compiled_text]


def _check_sharded(mesh, spec, inputs, *, causal, local, kv_spec=None):
    """Runs with q, k, v, dout sharded by `spec` (k and v by kv_spec if given, dlse by the batch
    and heads part of spec) and checks the results against the single-device run, and the
    collectives against `local`."""
    expected = _attention_and_grads(*inputs, causal=causal)
    batch_axes, _, head_axes = (tuple(spec) + (None,) * 3)[:3]
    kv_sharding = NamedSharding(mesh, spec if kv_spec is None else kv_spec)
    shardings = [NamedSharding(mesh, spec), kv_sharding, kv_sharding, NamedSharding(mesh, spec),
                 NamedSharding(mesh, P(batch_axes, head_axes))]
    sharded = [jax.device_put(x, s) for x, s in zip(inputs, shardings)]
    compiled = _attention_and_grads.lower(*sharded, causal=causal).compile()
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), compiled(*sharded), expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5, err_msg=name)
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


def test_sequence_sharding_is_gathered_not_wrong(mesh):
    # Causal with bottom-right alignment: a local slice of queries would mask wrongly.
    text = _check_sharded(mesh, P("x", "y"), _inputs(2, 32, 4, 4, 16), causal=True, local=False)
    assert "all-gather" in text


def test_gspmd_partitioner(mesh):
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        _attention_and_grads.clear_cache()
        _check_sharded(mesh, P("x", None, "y"), _inputs(2, 17, 4, 4, 16), causal=True,
                       local=True)
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
