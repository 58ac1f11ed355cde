"""flash_attention as a JAX function: jit, vmap, return_lse, implementations, forward mode."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash

reference = jax.jit(jax_flash.attention_reference, static_argnames=("causal", "softmax_scale"))


def _assert_matches_reference(out, lse, q, k, v, *, causal, softmax_scale=None):
    ref_out, ref_lse = reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_jit_matches_reference(make_qkv, causal):
    q, k, v = make_qkv(2, 97, 130, 3, 40)
    attention = jax.jit(functools.partial(
        jax_flash.flash_attention, causal=causal, softmax_scale=0.3, return_lse=True))
    out, lse = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 3, 97) and lse.dtype == jnp.float32
    _assert_matches_reference(out, lse, q, k, v, causal=causal, softmax_scale=0.3)


def test_eager_call_and_default_scale(make_qkv):
    q, k, v = make_qkv(1, 17, 17, 2, 64, jnp.bfloat16)
    out = jax_flash.flash_attention(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    ref_out, _ = reference(q, k, v, causal=False, softmax_scale=1 / 8)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2)


def test_one_query_sees_every_key_when_causal(make_qkv):
    """Bottom-right alignment: the last query (here the only one) sees all keys."""
    q, k, v = make_qkv(2, 1, 33, 2, 40)
    causal = jax_flash.flash_attention(q, k, v, causal=True)
    full = jax_flash.flash_attention(q, k, v, causal=False)
    np.testing.assert_allclose(causal, full, atol=1e-6, rtol=1e-6)


def test_xla_and_auto_agree_on_cpu(on_cpu, make_qkv):
    q, k, v = make_qkv(2, 130, 97, 2, 40)
    for causal in (False, True):
        auto = jax_flash.flash_attention(q, k, v, causal=causal, return_lse=True)
        xla = jax_flash.flash_attention(q, k, v, causal=causal, return_lse=True,
                                        implementation="xla")
        for a, b in zip(auto, xla):
            np.testing.assert_array_equal(a, b)


def test_cpu_use_does_not_warn(on_cpu, make_qkv):
    q, k, v = make_qkv(1, 17, 17, 1, 32, jnp.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(jax_flash.flash_attention)(q, k, v).block_until_ready()


def test_cuda_implementation_refused_on_cpu(on_cpu, make_qkv):
    q, k, v = make_qkv(1, 17, 17, 1, 32, jnp.float16)
    attention = jax.jit(functools.partial(jax_flash.flash_attention, implementation="cuda"))
    with pytest.raises(RuntimeError, match="implementation='cuda' runs only on CUDA GPUs.*cpu"):
        attention(q, k, v)


# ---- vmap --------------------------------------------------------------------------------------

def _stack(make_qkv, count, axis, **shape):
    """count independent (q, k, v) draws, stacked along `axis` of each array."""
    draws = [make_qkv(**shape, seed=seed) for seed in range(count)]
    return tuple(jnp.stack(parts, axis=axis) for parts in zip(*draws))


def _attention(q, k, v, *, causal=True):
    return jax_flash.flash_attention(q, k, v, causal=causal, return_lse=True)


@pytest.mark.parametrize("axis", [0, 1, 4])
def test_vmap_batched_everywhere(make_qkv, axis):
    q, k, v = _stack(make_qkv, 3, axis, batch=2, seqlen_q=17, seqlen_k=23, heads=2, head_dim=40)
    out, lse = jax.vmap(_attention, in_axes=axis)(q, k, v)
    assert out.shape == (3, 2, 17, 2, 40) and lse.shape == (3, 2, 2, 17)
    for i in range(3):
        q_i, k_i, v_i = (jnp.take(x, i, axis=axis) for x in (q, k, v))
        _assert_matches_reference(out[i], lse[i], q_i, k_i, v_i, causal=True)


def test_vmap_with_shared_kv(make_qkv):
    q, _, _ = _stack(make_qkv, 3, 0, batch=2, seqlen_q=17, seqlen_k=23, heads=2, head_dim=40)
    _, k, v = make_qkv(2, 17, 23, 2, 40, seed=7)
    out, lse = jax.vmap(_attention, in_axes=(0, None, None))(q, k, v)
    assert out.shape == (3, 2, 17, 2, 40)
    for i in range(3):
        _assert_matches_reference(out[i], lse[i], q[i], k, v, causal=True)


def test_vmap_with_shared_q(make_qkv):
    _, k, v = _stack(make_qkv, 3, 1, batch=2, seqlen_q=17, seqlen_k=23, heads=2, head_dim=40)
    q, _, _ = make_qkv(2, 17, 23, 2, 40, seed=7)
    out, lse = jax.vmap(_attention, in_axes=(None, 1, 1))(q, k, v)
    assert out.shape == (3, 2, 17, 2, 40)
    for i in range(3):
        _assert_matches_reference(out[i], lse[i], q, k[:, i], v[:, i], causal=True)


def test_nested_vmap_under_jit(make_qkv):
    """Outer axis maps q only; inner axis maps q, k and v at different positions."""
    q, k, v = _stack(make_qkv, 2, 0, batch=1, seqlen_q=9, seqlen_k=12, heads=2, head_dim=16)
    q = jnp.stack([q, q * 0.5 + 1.0, -q], axis=2)  # (2, 1, 3, 9, 2, 16): outer axis 2
    inner = jax.vmap(_attention, in_axes=(0, 0, 0))
    outer = jax.jit(jax.vmap(inner, in_axes=(2, None, None)))
    out, lse = outer(q, k, v)
    assert out.shape == (3, 2, 1, 9, 2, 16) and lse.shape == (3, 2, 1, 2, 9)
    for i in range(3):
        for j in range(2):
            _assert_matches_reference(out[i, j], lse[i, j], q[j, :, i], k[j], v[j], causal=True)


def test_vmap_without_lse(make_qkv):
    q, k, v = _stack(make_qkv, 2, 0, batch=1, seqlen_q=9, seqlen_k=9, heads=1, head_dim=16)
    out = jax.vmap(jax_flash.flash_attention)(q, k, v)
    ref_out, _ = jax.vmap(functools.partial(reference, causal=False))(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)


# ---- shapes without running, and differentiation ----------------------------------------------

def test_eval_shape():
    q = jax.ShapeDtypeStruct((2, 33, 4, 100), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 7, 4, 100), jnp.bfloat16)
    out, lse = jax.eval_shape(_attention, q, kv, kv)
    assert (out.shape, out.dtype) == ((2, 33, 4, 100), jnp.bfloat16)
    assert (lse.shape, lse.dtype) == ((2, 4, 33), jnp.float32)


def _loss(q, k, v):
    return jnp.sum(jax_flash.flash_attention(q, k, v, causal=True) ** 2)


def test_forward_mode_raises(make_qkv):
    """Forward mode is JAX's refusal for custom VJPs; reverse mode is in test_bwd_cpu.py."""
    q, k, v = make_qkv(1, 9, 9, 1, 16)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(_loss, (q, k, v), (q, k, v))


def test_kernel_info_describes_the_install():
    info = jax_flash.kernel_info()
    assert set(info) == {"kernels_built", "cuda_archs", "head_dims", "reason"}
    assert info["kernels_built"] == (info["reason"] == "")
    assert jax_flash.__version__ == "0.1.0"
