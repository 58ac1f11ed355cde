"""The features under vmap (any in_axes, operands that broadcast over batch), jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from grad_oracle import random_normal
from test_features_cpu import make_inputs

TOL = dict(atol=2e-5, rtol=2e-5)


def test_vmap_over_every_feature_operand():
    """vmap over q, a batch-1 bias (broadcast over q's batch of 2), a mask, alibi slopes and
    sinks, with unbatched k, v: the same as a loop, gradients included."""
    n, batch, seqlen_q, seqlen_k, heads = 3, 2, 9, 14, 4
    qs = random_normal(0, (n, batch, seqlen_q, heads, 8), jnp.float32)
    _, k, v = make_inputs(1, batch, seqlen_q, seqlen_k, heads, 2, 8)
    biases = random_normal(2, (n, 1, heads, 1, seqlen_k), jnp.float32)
    masks = jnp.asarray(np.random.default_rng(3).random((n, seqlen_q, seqlen_k)) < 0.8)
    slopes = jnp.abs(random_normal(4, (n, heads), jnp.float32))
    sinks = random_normal(5, (heads,), jnp.float32)

    def loss(q, bias, mask, slopes, sinks):
        out, lse = jax_flash.flash_attention(q, k, v, causal=True, bias=bias, mask=mask,
                                             alibi_slopes=slopes, sinks=sinks, window_size=(6, -1),
                                             return_lse=True)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4)))
    batched = jax.jit(jax.vmap(grad, in_axes=(0, 0, 0, 0, None)))(qs, biases, masks, slopes, sinks)
    for i in range(n):
        single = grad(qs[i], biases[i], masks[i], slopes[i], sinks)
        for got, want in zip(batched, single):
            np.testing.assert_allclose(got[i], want, **TOL)


def test_vmap_with_unbatched_broadcast_bias_and_batched_mask():
    """An unbatched bias [1, ...] stays unbatched; its gradient sums over the mapped axis."""
    n = 2
    q, k, v = make_inputs(6, 2, 7, 10, 2, 1, 8)
    masks = jnp.asarray(np.random.default_rng(7).random((n, 2, 1, 7, 10)) < 0.8)
    bias = random_normal(8, (1, 1, 7, 10), jnp.float32)
    loss = lambda bias, mask: jnp.sum(jnp.cos(jax_flash.flash_attention(q, k, v, bias=bias,
                                                                         mask=mask)))
    total = lambda bias: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(bias, masks))
    grad = jax.jit(jax.grad(total))(bias)
    expected = sum(jax.jit(jax.grad(loss))(bias, masks[i]) for i in range(n))
    assert grad.shape == bias.shape
    np.testing.assert_allclose(grad, expected, **TOL)


def test_gradients_without_dbias_match_those_with_it():
    """Differentiated with respect to q, k and v only (vmapped over a batched bias, under jit),
    the backward drops dbias (the DCE rule): dq, dk and dv stay those computed beside dbias."""
    n = 2
    q, k, v = make_inputs(10, 2, 9, 12, 4, 2, 8)
    biases = random_normal(11, (n, 2, 4, 9, 12), jnp.float32)
    loss = lambda q, k, v, bias: jnp.sum(jnp.sin(jax_flash.flash_attention(
        q, k, v, bias=bias, causal=True)))
    mapped = lambda argnums: jax.jit(jax.vmap(jax.grad(loss, argnums=argnums),
                                              in_axes=(None, None, None, 0)))
    without = mapped((0, 1, 2))(q, k, v, biases)
    with_dbias = mapped((0, 1, 2, 3))(q, k, v, biases)
    assert with_dbias[3].shape == biases.shape
    for got, want in zip(without, with_dbias[:3], strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_vmap_over_dropout_keys():
    """Each mapped key draws its own mask, the same one it draws unmapped."""
    q, k, v = make_inputs(9, 1, 8, 8, 2, 2, 8)
    keys = jax.random.split(jax.random.key(0), 3)
    attention = jax.jit(lambda rng: jax_flash.flash_attention(q, k, v, dropout_rate=0.5,
                                                              dropout_rng=rng))
    batched = jax.jit(jax.vmap(attention))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], attention(keys[i]), **TOL)
    assert np.abs(np.asarray(batched[0] - batched[1])).max() > 0.1
