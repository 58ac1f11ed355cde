"""Gradients with the CUDA kernel's forward (implementation="cuda") against the float32 oracle's;
GPU only.

The backward is the XLA blockwise one for now (the backward kernel comes later and will be held to
these same tests); it starts from the kernel's out and lse, so these tests check that the two
agree on what the residuals mean. The bar is FlashAttention's, as grad_oracle states it, with
SLACK for the kernel's forward rounding differently from the dense computation's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import assert_grads_within_rule, random_normal
from test_fwd_gpu import DTYPES, random_qkv, require_kernel, seed  # noqa: F401 (seed: a fixture)

pytestmark = pytest.mark.gpu

SLACK = 1e-3  # times the largest entry of the oracle's gradient

SEQLENS = [(1, 1), (97, 97), (257, 113), (113, 257), (1025, 1025)]


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
    grads = _kernel_grads(q, k, v, dout, causal=causal)
    assert_grads_within_rule(grads, q, k, v, dout, causal=causal, slack=SLACK)


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal", [(113, 257, True), (257, 113, False)])
def test_lse_cotangent(seed, seqlen_q, seqlen_k, causal):
    """A loss on the kernel's lse as well as on out."""
    require_kernel(64)
    q, k, v = random_qkv(seed, 2, seqlen_q, seqlen_k, 3, 64, jnp.bfloat16)
    dout, dlse = _cotangents(seed, q, with_lse=True)
    grads = _kernel_grads(q, k, v, dout, dlse, causal=causal)
    assert_grads_within_rule(grads, q, k, v, dout, dlse, causal=causal, slack=SLACK)


def test_deterministic_grads_are_bitwise_reproducible(seed):
    """One compiled gradient run twice gives the same bits: nothing reduces in a racing order."""
    require_kernel(128)
    q, k, v = random_qkv(seed, 2, 1025, 1025, 4, 128, jnp.bfloat16)
    dout, dlse = _cotangents(seed, q, with_lse=True)
    grads = functools.partial(_kernel_grads, causal=True, deterministic=True)
    first, second = grads(q, k, v, dout, dlse), grads(q, k, v, dout, dlse)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_grad_runs_the_kernel_forward():
    """Under jax.grad the forward is still our custom call, and it survives compilation."""
    require_kernel(128)
    x = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jax_flash.flash_attention(
        q, k, v, causal=True, implementation="cuda").astype(jnp.float32) ** 2)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
    assert "jax_flash_fwd" in lowered.as_text()
    assert "jax_flash_fwd" in lowered.compile().as_text()
