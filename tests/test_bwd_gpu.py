"""Gradients of the CUDA kernels (implementation="cuda": the forward and the backward kernel)
against the float32 oracle's; GPU only.

The bar is FlashAttention's, as grad_oracle states it, with SLACK for the kernels rounding
differently from the dense computation. Every gradient is computed on poisoned memory (see
test_fwd_gpu.run_on_poisoned_memory), so an element the backward never writes fails the test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import assert_grads_within_rule, random_normal
from test_fwd_gpu import (DTYPES, random_qkv, require_kernel, run_on_poisoned_memory,  # noqa: F401
                          seed)  # seed: a fixture

pytestmark = pytest.mark.gpu

SLACK = 1e-3  # times the largest entry of the oracle's gradient

SEQLENS = [(1, 1), (17, 17), (97, 97), (257, 113), (113, 257), (17, 1025), (1025, 1025)]


def _cotangents(seed, q, with_lse=False):
    """Random dout in q's dtype (and float32 dlse): never zeros, which hide missing terms."""
    batch, seqlen_q, heads, _ = q.shape
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32) if with_lse else None
    return dout, dlse


@functools.partial(jax.jit, static_argnames=("causal", "deterministic"))
def _kernel_grads(q, k, v, dout, dlse=None, *, causal, deterministic=False):
    """The VJP of flash_attention with the kernel's forward, for cotangents dout [and dlse]."""
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                                  implementation="cuda", deterministic=deterministic)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return vjp((dout, jnp.zeros_like(lse) if dlse is None else dlse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_grads(seed, seqlen_q, seqlen_k, head_dim, dtype, causal):
    """dq, dk, dv for every dtype, causal or not, a padded head dim, ragged and long seqlens, and
    (257, 113) causal rows that see no key."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 1, seqlen_q, seqlen_k, 2, head_dim, DTYPES[dtype])
    dout, _ = _cotangents(seed, q)
    grads = run_on_poisoned_memory(functools.partial(_kernel_grads, causal=causal), q, k, v, dout)
    assert_grads_within_rule(grads, q, k, v, dout, causal=causal, slack=SLACK)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 96, 160, 192, 224, 256])
def test_grads_every_head_dim(seed, head_dim, causal):
    """The head dims test_grads leaves out, at ragged seqlens that differ."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 2, 203, 150, 2, head_dim, jnp.bfloat16)
    dout, _ = _cotangents(seed, q)
    grads = run_on_poisoned_memory(functools.partial(_kernel_grads, causal=causal), q, k, v, dout)
    assert_grads_within_rule(grads, q, k, v, dout, causal=causal, slack=SLACK)


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal", [(113, 257, True), (257, 113, False)])
def test_lse_cotangent(seed, seqlen_q, seqlen_k, causal):
    """A loss on the kernel's lse as well as on out."""
    require_kernel(64)
    q, k, v = random_qkv(seed, 2, seqlen_q, seqlen_k, 3, 64, jnp.bfloat16)
    dout, dlse = _cotangents(seed, q, with_lse=True)
    grads = _kernel_grads(q, k, v, dout, dlse, causal=causal)
    assert_grads_within_rule(grads, q, k, v, dout, dlse, causal=causal, slack=SLACK)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_deterministic_grads_are_bitwise_reproducible(seed, head_dim):
    """One compiled gradient run twice gives the same bits: nothing reduces in a racing order
    (each head dim's own tile shapes)."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 2, 1025, 1025, 4, head_dim, jnp.bfloat16)
    dout, dlse = _cotangents(seed, q, with_lse=True)
    grads = functools.partial(_kernel_grads, causal=True, deterministic=True)
    first, second = grads(q, k, v, dout, dlse), grads(q, k, v, dout, dlse)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert_grads_within_rule(first, q, k, v, dout, dlse, causal=True, slack=SLACK)


def test_grad_runs_both_kernels():
    """Under jax.grad the forward and the backward are our custom calls, after compilation too."""
    require_kernel(128)
    x = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jax_flash.flash_attention(
        q, k, v, causal=True, implementation="cuda").astype(jnp.float32) ** 2)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
    compiled = lowered.compile().as_text()
    for target in ("jax_flash_fwd", "jax_flash_bwd"):
        assert target in lowered.as_text()
        assert target in compiled
