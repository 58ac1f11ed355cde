"""Gradients of flash_attention on the XLA path: numerics against the dense float32 oracle, and
every transformation a training step puts them through."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flash
from jax_flash._blockwise import blockwise_attention
from jax_flash._blockwise_bwd import blockwise_attention_bwd
from grad_oracle import assert_grads_within_rule, random_normal, reference_grads

# float32 gradients against the float32 oracle: only the order of the sums differs.
ATOL = RTOL = 1e-5


def _cotangents(q, seed=1, with_lse=False):
    """Random dout (and dlse) for outputs of q's shape: the loss sum(out·dout) [+ sum(lse·dlse)]."""
    batch, seqlen_q, heads, _ = q.shape
    dout = random_normal(seed, q.shape, q.dtype)
    dlse = random_normal(seed + 1, (batch, heads, seqlen_q), jnp.float32) if with_lse else None
    return dout, dlse


@functools.partial(jax.jit, static_argnames=("causal", "deterministic"))
def _grads(q, k, v, dout, dlse=None, *, causal, deterministic=False):
    """jax.grad of sum(out·dout) [+ sum(lse·dlse)] through flash_attention."""

    def loss(q, k, v):
        out, lse = jax_flash.flash_attention(q, k, v, causal=causal, return_lse=True,
                                             deterministic=deterministic)
        value = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
        return value if dlse is None else value + jnp.sum(lse * dlse)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(grads, expected):
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, expected):
        np.testing.assert_allclose(grad, ref, atol=ATOL, rtol=RTOL, err_msg=name)


# ---- numerics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,causal", [
    (1, 1, 40, False), (17, 17, 40, True), (97, 97, 40, False), (130, 130, 40, True),
    (17, 130, 40, True), (130, 17, 40, False), (1, 97, 40, True), (97, 130, 64, True),
    (130, 97, 64, False),
])
def test_float32_matches_oracle(make_qkv, seqlen_q, seqlen_k, head_dim, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 3, head_dim)
    dout, _ = _cotangents(q)
    _assert_close(_grads(q, k, v, dout, causal=causal),
                  reference_grads(q, k, v, dout, causal=causal))


def test_lse_cotangent(make_qkv):
    """A loss on lse as well as out: d lse / d scores = p adds p·dlse to the scores' cotangent."""
    q, k, v = make_qkv(2, 97, 130, 3, 40)
    dout, dlse = _cotangents(q, with_lse=True)
    _assert_close(_grads(q, k, v, dout, dlse, causal=True),
                  reference_grads(q, k, v, dout, dlse, causal=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_that_see_no_key(make_qkv, dtype):
    """Causal with seqlen_q > seqlen_k: the first 113 queries see nothing. Their cotangents, of
    out and of lse alike, reach nothing: dq is 0 there and dk, dv are what the other rows give."""
    q, k, v = make_qkv(2, 130, 17, 2, 40, dtype)
    dout, dlse = _cotangents(q, with_lse=True)
    grads = _grads(q, k, v, dout, dlse, causal=True)
    empty = 130 - 17
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), name
    np.testing.assert_array_equal(np.asarray(grads[0][:, :empty], np.float32), 0.0)
    dlse = dlse.at[:, :, :empty].set(0.0)  # the oracle's lse has a NaN derivative there
    if dtype == jnp.float32:
        _assert_close(grads, reference_grads(q, k, v, dout, dlse, causal=True))
    else:
        assert_grads_within_rule(grads, q, k, v, dout, dlse, causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,dtype,causal", [
    (97, 97, 64, jnp.bfloat16, True),
    (17, 130, 40, jnp.float16, False),
])
def test_low_precision_within_twice_dense_error(make_qkv, seqlen_q, seqlen_k, head_dim, dtype,
                                                causal):
    """FlashAttention's bar, see grad_oracle (bf16 with dlse: test_rows_that_see_no_key)."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 2, head_dim, dtype)
    dout, dlse = _cotangents(q, with_lse=not causal)
    grads = _grads(q, k, v, dout, dlse, causal=causal)
    assert_grads_within_rule(grads, q, k, v, dout, dlse, causal=causal)


@pytest.mark.parametrize("seqlen_q,seqlen_k,block_q,block_k,causal", [
    (97, 130, 16, 24, False), (97, 130, 7, 5, True), (130, 17, 32, 8, True),
])
def test_tiles_that_do_not_divide_seqlen(make_qkv, seqlen_q, seqlen_k, block_q, block_k, causal):
    """Many tiles, ragged last ones, and (130, 17) causal tiles that hold only empty rows."""
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 40)
    dout, dlse = _cotangents(q, with_lse=True)
    scale = 1 / math.sqrt(40)
    out, lse = blockwise_attention(q, k, v, causal=causal, softmax_scale=scale)
    dlse = jnp.where(jnp.isneginf(lse), 0.0, dlse)
    backward = jax.jit(functools.partial(blockwise_attention_bwd, causal=causal,
                                         softmax_scale=scale, block_q=block_q, block_k=block_k))
    _assert_close(backward(q, k, v, out, lse, dout, dlse),
                  reference_grads(q, k, v, dout, dlse, causal=causal))


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal", [(5, 7, True), (7, 5, False), (6, 6, True)])
def test_check_grads(make_qkv, seqlen_q, seqlen_k, causal):
    """Reverse mode against finite differences, out and lse both (no row without keys: a
    finite difference of lse = -inf is NaN)."""
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 5)
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                                  implementation="xla")
    check_grads(attention, (q, k, v), order=1, modes=["rev"])


def test_memory_grows_linearly_with_seqlen():
    """Scratch memory of the compiled backward is O(seqlen), never the seqlen² scores."""

    def scratch_bytes(seqlen):
        x = jax.ShapeDtypeStruct((1, seqlen, 2, 64), jnp.float32)
        rows = jax.ShapeDtypeStruct((1, 2, seqlen), jnp.float32)
        backward = jax.jit(functools.partial(blockwise_attention_bwd, causal=True,
                                             softmax_scale=0.125))
        compiled = backward.lower(x, x, x, x, rows, x, rows).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = scratch_bytes(4096), scratch_bytes(16384)
    assert long <= 5 * short  # 4x the tokens; quadratic memory would grow 16x
    assert long < 16384 * 16384 * 4 // 4  # a quarter of one head's float32 scores


# ---- transformations ---------------------------------------------------------------------------

def _loss(q, k, v, dout, causal=True):
    return jnp.sum(jax_flash.flash_attention(q, k, v, causal=causal) * dout)


def test_value_and_grad(make_qkv):
    q, k, v = make_qkv(2, 17, 23, 2, 40)
    dout, _ = _cotangents(q)
    value, grads = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2)))(q, k, v, dout)
    np.testing.assert_allclose(value, _loss(q, k, v, dout), rtol=1e-6)
    _assert_close(grads, reference_grads(q, k, v, dout, causal=True))


def test_grad_under_jit_matches_eager(make_qkv):
    q, k, v = make_qkv(2, 17, 23, 2, 40)
    dout, _ = _cotangents(q)
    eager = jax.grad(_loss, argnums=(0, 1, 2))(q, k, v, dout)
    _assert_close(jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(q, k, v, dout), eager)


def _stack(make_qkv, count, axis, shared_kv=False):
    """count draws of (q, k, v) stacked along `axis`; with shared_kv one k, v for all."""
    draws = [make_qkv(2, 9, 12, 2, 16, seed=seed) for seed in range(count)]
    stacked = [jnp.stack(parts, axis=axis) for parts in zip(*draws)]
    return (stacked[0], *draws[0][1:]) if shared_kv else tuple(stacked)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, None), (1, 1, 1)])
def test_vmap_of_grad(make_qkv, in_axes):
    q, k, v = _stack(make_qkv, 3, in_axes[0], shared_kv=in_axes[1] is None)
    dout = random_normal(1, (2, 9, 2, 16), jnp.float32)
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
    grads = jax.jit(jax.vmap(grad, in_axes=(*in_axes, None)))(q, k, v, dout)
    for i in range(3):
        q_i, k_i, v_i = (x if axis is None else jnp.take(x, i, axis=axis)
                         for x, axis in zip((q, k, v), in_axes))
        _assert_close([g[i] for g in grads], grad(q_i, k_i, v_i, dout))


def test_grad_of_vmap_sums_shared_kv(make_qkv):
    """k and v shared by every vmapped q: their gradients are the sums over the mapped axis."""
    q, k, v = _stack(make_qkv, 3, 0, shared_kv=True)
    dout = random_normal(1, (2, 9, 2, 16), jnp.float32)
    mapped_loss = lambda q, k, v: jnp.sum(jax.vmap(_loss, in_axes=(0, None, None, None))(
        q, k, v, dout))
    dq, dk, dv = jax.grad(mapped_loss, argnums=(0, 1, 2))(q, k, v)
    assert dk.shape == k.shape and dv.shape == v.shape
    per_slice = [reference_grads(q[i], k, v, dout, causal=True) for i in range(3)]
    _assert_close((dq, dk, dv), ([g[0] for g in per_slice], sum(g[1] for g in per_slice),
                                 sum(g[2] for g in per_slice)))


def _layer(weights, x):
    """A small attention layer: projections in, flash_attention, a nonlinearity out."""
    batch, seqlen, _ = x.shape
    q, k, v = (jnp.einsum("bsi,io->bso", x, w).reshape(batch, seqlen, 2, 8) for w in weights)
    return jnp.sum(jnp.tanh(jax_flash.flash_attention(jnp.sin(q), k, v, causal=True)) ** 2)


@pytest.mark.parametrize("names", [jax_flash.RESIDUAL_NAMES, jax_flash.RESIDUAL_NAMES[:3]],
                         ids=["all", "qkv_only"])
def test_checkpoint_policy_saves_the_named_residuals(capsys, names):
    """save_only_these_names(*RESIDUAL_NAMES) saves exactly the residuals named (nothing but the
    arguments besides) and gives the same gradients; without out and lse the forward reruns."""
    x = random_normal(0, (2, 17, 16), jnp.float32)
    weights = random_normal(1, (3, 16, 16), jnp.float32) * 0.3
    policy = jax.checkpoint_policies.save_only_these_names(*names)
    layer = jax.checkpoint(_layer, policy=policy)

    jax.ad_checkpoint.print_saved_residuals(layer, weights, x)
    saved = capsys.readouterr().out.strip().splitlines()
    assert sum("from the argument" in line for line in saved) == 2
    named = sorted(line.split("named '")[1].split("'")[0] for line in saved if "named '" in line)
    assert named == sorted(names) and len(saved) == 2 + len(names)

    _assert_close(jax.grad(layer)(weights, x), jax.grad(_layer)(weights, x))


def test_higher_order_raises_clearly(make_qkv):
    q, k, v = make_qkv(1, 9, 9, 1, 16)
    dout, _ = _cotangents(q)
    grad_q = jax.grad(_loss)
    match = "jax-flash: higher-order derivatives of flash_attention are not supported"
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda q: jnp.sum(grad_q(q, k, v, dout)))(q)
    with pytest.raises(NotImplementedError, match=match):
        jax.hessian(_loss)(q, k, v, dout)


def test_deterministic_grads_are_bitwise_reproducible(make_qkv):
    q, k, v = make_qkv(2, 97, 130, 2, 40)
    dout, dlse = _cotangents(q, with_lse=True)
    first = _grads(q, k, v, dout, dlse, causal=True, deterministic=True)
    jax.clear_caches()  # the second run compiles afresh
    second = _grads(q, k, v, dout, dlse, causal=True, deterministic=True)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    jaxpr = str(jax.make_jaxpr(functools.partial(_grads, causal=True, deterministic=True))(
        q, k, v, dout, dlse))
    assert "jax_flash_bwd" in jaxpr and "deterministic=True" in jaxpr
