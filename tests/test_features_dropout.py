"""Dropout on the XLA path: keep-rate statistics, reproducibility from the key, the backward using
the forward's mask, and the oracle given the same mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flash
from jax_flash._blockwise import blockwise_attention
from jax_flash._dropout import dense_keep_mask, dropout_seed
from test_features_cpu import make_inputs

RATE = 0.3


def _identity_values(batch, seqlen_k, heads):
    """v [b, sk, h, sk] with v[:, j, :, :] = e_j: out[i] is then row i of the probabilities."""
    eye = jnp.eye(seqlen_k, dtype=jnp.float32)
    return jnp.broadcast_to(eye[None, :, None, :], (batch, seqlen_k, heads, seqlen_k))


def test_keep_rate_and_scaling():
    """Probabilities are dropped at the rate asked for, and the kept ones scaled by 1/(1-rate)."""
    batch, seqlen_q, seqlen_k, heads = 2, 64, 48, 4
    q, k, _ = make_inputs(0, batch, seqlen_q, seqlen_k, heads, heads, seqlen_k)
    v = _identity_values(batch, seqlen_k, heads)
    probs = jax_flash.flash_attention(q, k, v)
    dropped = jax_flash.flash_attention(q, k, v, dropout_rate=RATE, dropout_rng=jax.random.key(1))
    kept = np.asarray(dropped) != 0
    n = kept.size
    # Binomial: 5 standard deviations.
    assert abs(kept.mean() - (1 - RATE)) < 5 * np.sqrt(RATE * (1 - RATE) / n)
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(probs)[kept] / (1 - RATE),
                               rtol=1e-5)


def test_same_key_same_output_other_key_other_output():
    q, k, v = make_inputs(1, 2, 17, 19, 4, 2, 8)
    attention = jax.jit(lambda rng: jax_flash.flash_attention(q, k, v, causal=True,
                                                              dropout_rate=RATE, dropout_rng=rng))
    first, again = attention(jax.random.key(3)), attention(jax.random.key(3))
    other = attention(jax.random.key(4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 0.1
    # A raw uint32[2] key works as well.
    raw_key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(attention(raw_key), attention(raw_key))


def test_mask_does_not_depend_on_the_tiles():
    q, k, v = make_inputs(2, 1, 40, 33, 2, 2, 8)
    features = dict(causal=False, softmax_scale=0.35, dropout_rate=RATE)
    seed = dropout_seed(jax.random.key(5), 1)
    outs = [jax.jit(functools.partial(blockwise_attention, block_q=bq, block_k=bk, **features))(
        q, k, v, seed)[0] for bq, bk in ((16, 8), (40, 33))]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_matches_oracle_with_the_same_mask():
    """Forward and every gradient against the dense oracle given dense_keep_mask, with causal,
    GQA, odd seqlens and an lse cotangent."""
    batch, seqlen_q, seqlen_k, heads, kv_heads = 2, 13, 21, 4, 2
    q, k, v = make_inputs(3, batch, seqlen_q, seqlen_k, heads, kv_heads, 8)
    rng = jax.random.key(7)
    keep = dense_keep_mask(rng, RATE, batch=batch, heads=heads, seqlen_q=seqlen_q,
                           seqlen_k=seqlen_k)
    flash = lambda q, k, v: jax_flash.flash_attention(
        q, k, v, causal=True, return_lse=True, dropout_rate=RATE, dropout_rng=rng)
    oracle = lambda q, k, v: jax_flash.attention_reference(
        q, k, v, causal=True, dropout_rate=RATE, dropout_keep=keep)

    @jax.jit
    def results_and_grads(q, k, v):
        (out, lse), vjp = jax.vjp(flash, q, k, v)
        (ref_out, ref_lse), ref_vjp = jax.vjp(oracle, q, k, v)
        cotangents = (jnp.cos(ref_out), jnp.sin(ref_lse))
        return (out, lse, vjp(cotangents)), (ref_out, ref_lse, ref_vjp(cotangents))

    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results_and_grads(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=2e-5, rtol=2e-5, err_msg=name)


def test_check_grads_with_a_fixed_key():
    """The backward regenerates the forward's mask: numerical derivatives agree."""
    q, k, v = make_inputs(4, 1, 9, 11, 2, 1, 8)
    f = jax.jit(lambda q, k, v: jax_flash.flash_attention(
        q, k, v, dropout_rate=RATE, dropout_rng=jax.random.key(9)))
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_rate_zero_draws_nothing():
    q, k, v = make_inputs(5, 1, 9, 11, 2, 2, 8)
    rng = jax.random.key(0)
    attention = lambda q: jax_flash.flash_attention(q, k, v, dropout_rate=0.0, dropout_rng=rng)
    assert "threefry" not in str(jax.make_jaxpr(attention)(q))
    assert "random_bits" not in str(jax.make_jaxpr(attention)(q))
    np.testing.assert_array_equal(attention(q), jax_flash.flash_attention(q, k, v))


@pytest.mark.parametrize("options,match", [
    ({"dropout_rate": 0.1}, "needs dropout_rng"),
    ({"dropout_rate": 1.0, "dropout_rng": jax.random.key(0)}, r"dropout_rate must be in \[0, 1\)"),
    ({"dropout_rate": 0.1, "dropout_rng": jnp.zeros((3,), jnp.uint32)}, "one PRNG key"),
])
def test_bad_dropout_arguments(options, match):
    q, k, v = make_inputs(0, 1, 5, 5, 2, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        jax_flash.flash_attention(q, k, v, **options)
