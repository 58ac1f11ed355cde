"""A head_dim of v unlike that of q and k (DeepSeek's MLA shape, q/k 192 with v 128, and the
other way round): outputs, lse and every gradient against the float32 oracle, on the pure-JAX
path (the CUDA lowering: tests/test_lowering.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import random_normal

# (head_dim of q and k, head_dim of v)
HEAD_DIMS = [(192, 128), (64, 96), (40, 256)]


def _inputs(seed, qk_dim, v_dim, seqlen_q=33, seqlen_k=47, heads=4, kv_heads=2):
    q = random_normal(seed, (2, seqlen_q, heads, qk_dim), jnp.float32)
    k = random_normal(seed + 1, (2, seqlen_k, kv_heads, qk_dim), jnp.float32)
    v = random_normal(seed + 2, (2, seqlen_k, kv_heads, v_dim), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qk_dim,v_dim", HEAD_DIMS)
def test_forward_and_gradients_match_the_oracle(qk_dim, v_dim, causal):
    q, k, v = _inputs(qk_dim + v_dim, qk_dim, v_dim)
    options = dict(causal=causal, window_size=(20, -1))
    flash = functools.partial(jax_flash.flash_attention, return_lse=True, **options)
    reference = functools.partial(jax_flash.attention_reference, **options)
    (out, lse), vjp = jax.vjp(flash, q, k, v)
    (out_ref, lse_ref), vjp_ref = jax.vjp(reference, q, k, v)
    assert out.shape == (2, 33, 4, v_dim)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    cotangents = (random_normal(1, out.shape, jnp.float32), random_normal(2, lse.shape, jnp.float32))
    for name, got, want in zip(("dq", "dk", "dv"), vjp(cotangents), vjp_ref(cotangents)):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_default_scale_follows_q_and_k():
    """Padding v (or q and k) must not change the default scale 1 / sqrt(head_dim of q)."""
    q, k, v = _inputs(5, 64, 128)
    out = jax_flash.flash_attention(q, k, v)
    np.testing.assert_allclose(out, jax_flash.attention_reference(q, k, v)[0], rtol=1e-5,
                               atol=1e-5)
    scaled = jax_flash.attention_reference(q, k, v, softmax_scale=1 / np.sqrt(128))[0]
    assert not np.allclose(out, scaled, atol=1e-3)  # the scale of v's head_dim is visibly wrong


def test_bad_head_dims_name_the_arrays():
    q, k, v = _inputs(6, 64, 64)
    with pytest.raises(ValueError, match=r"q and k must have the same head_dim .*k \(2, 47, 2, 32\)"):
        jax_flash.flash_attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match=r"head_dim 300 of v is larger than 256"):
        jax_flash.flash_attention(q, k, jnp.zeros((2, 47, 2, 300)))

