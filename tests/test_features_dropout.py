"""Dropout on the XLA path: the generator against Philox's published answers and the mask
against its definition (which the CUDA kernels share), keep-rate statistics, reproducibility
from the key, the backward using the forward's mask, and the oracle given the same mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flash
from jax_flash._blockwise import blockwise_attention
from jax_flash._dropout import (dense_keep_mask, dropout_seed, keep_mask, philox2x32_10,
                                quantize_rate)
from test_features_cpu import make_inputs

RATE = 0.3
KEEP = 1 - quantize_rate(RATE)


def _philox_by_hand(counter0, counter1, key):
    """Philox-2x32-10 on Python integers, from its definition."""
    mask32 = 0xFFFFFFFF
    for _ in range(10):
        product = 0xD256D193 * counter0
        counter0, counter1 = ((product >> 32) ^ key ^ counter1) & mask32, product & mask32
        key = (key + 0x9E3779B9) & mask32
    return counter0, counter1


@pytest.mark.parametrize("counter0,counter1,key,expected", [
    # Random123's known-answer vectors for philox2x32 with 10 rounds.
    (0, 0, 0, (0xFF1DAE59, 0x6CD10DF2)),
    (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, (0x2C3F628B, 0xAB4FD7AD)),
    (0x243F6A88, 0x85A308D3, 0x13198A2E, (0xDD7CE038, 0xF62A4C12)),
])
def test_philox_known_answers(counter0, counter1, key, expected):
    words = philox2x32_10(*(jnp.uint32(x) for x in (counter0, counter1, key)))
    assert tuple(int(w) for w in words) == expected
    assert _philox_by_hand(counter0, counter1, key) == expected


def test_mask_follows_its_definition():
    """Every keep bit of a small mask from _dropout's definition (and cuda/dropout.h's): byte
    2·((j >> 5) & 1) + (j & 1) of word (i >> 3) & 1 of Philox(key seed[0]; h·sq + i with bit 3
    cleared, (j // 64 · 16 + (j % 32) // 2) xor seed[1]), kept iff ≥ rate · 256. Queries 8-15
    and keys 32-63 and 64-129 check the grouping, seqlen_q 40 with 3 heads the head term."""
    batch, kv_heads, group, seqlen_q, seqlen_k, rate = 2, 3, 1, 40, 130, quantize_rate(0.4)
    seed = jnp.asarray([[0x01234567, 0x89ABCDEF], [0xFFFFFFFF, 7]], jnp.uint32)
    keep = np.asarray(keep_mask(seed, rate, seqlen_q=seqlen_q, kv_heads=kv_heads, group=group,
                                query=jnp.arange(seqlen_q), key=jnp.arange(seqlen_k)))
    threshold = round(rate * 256)
    for b in range(batch):
        s0, s1 = (int(x) for x in seed[b])
        for h in range(kv_heads):
            for i in range(seqlen_q):
                for j in range(seqlen_k):
                    words = _philox_by_hand((h * seqlen_q + (i & ~8)) & 0xFFFFFFFF,
                                            ((j // 64) * 16 + (j % 32) // 2) ^ s1, s0)
                    byte = (words[(i >> 3) & 1] >> (8 * (2 * ((j >> 5) & 1) + (j & 1)))) & 0xFF
                    assert keep[b, h, 0, i, j] == (byte >= threshold), (b, h, i, j)


def test_rates_are_multiples_of_one_256th():
    assert quantize_rate(0.0) == 0.0
    assert quantize_rate(0.25) == 0.25
    assert quantize_rate(1e-9) == 1 / 256  # some dropout, never none
    assert quantize_rate(0.9999) == 255 / 256  # something kept
    assert abs(quantize_rate(0.3) - 0.3) <= 1 / 512


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
    assert abs(kept.mean() - KEEP) < 5 * np.sqrt(KEEP * (1 - KEEP) / n)
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(probs)[kept] / KEEP,
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
        q, k, v, causal=True, dropout_rate=1 - KEEP, dropout_keep=keep)

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
