"""Grouped-query and multi-query attention through the CUDA kernels (implementation="cuda"),
forward and gradients against the float32 oracle with FlashAttention's error rule; GPU only."""

import functools

import jax
import jax.numpy as jnp
import pytest

import jax_flash
from grad_oracle import assert_grads_within_rule, random_normal
from test_bwd_gpu import SLACK
from test_fwd_gpu import (DTYPES, assert_matches_oracle, require_kernel,  # noqa: F401
                          run_on_poisoned_memory, seed)  # seed: a fixture

pytestmark = pytest.mark.gpu

# (heads, kv_heads): GQA with groups of 4, MQA, and groups of 3.
HEADS = [(8, 2), (6, 1), (6, 2)]
SEQLENS = [(17, 17), (257, 113), (113, 257), (1025, 1025)]


def _random_gqa(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype):
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(key_q, (batch, seqlen_q, heads, head_dim), dtype)
    k = jax.random.normal(key_k, (batch, seqlen_k, kv_heads, head_dim), dtype)
    v = jax.random.normal(key_v, (batch, seqlen_k, kv_heads, head_dim), dtype)
    return q, k, v


def _repeat_kv(q, k, v):
    """k and v with each head repeated for its group: the same attention, in plain MHA form."""
    group = q.shape[2] // k.shape[2]
    return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_forward(seed, seqlen_q, seqlen_k, heads, kv_heads, dtype, causal):
    require_kernel(128)
    q, k, v = _random_gqa(seed, 2, seqlen_q, seqlen_k, heads, kv_heads, 128, DTYPES[dtype])
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                                  implementation="cuda")
    out, lse = run_on_poisoned_memory(attention, q, k, v)
    k_rep, v_rep = _repeat_kv(q, k, v)
    assert_matches_oracle(q, k_rep, v_rep, out, lse, causal=causal,
                          softmax_scale=1 / 128 ** 0.5)


@functools.partial(jax.jit, static_argnames=("causal",))
def _kernel_grads(q, k, v, dout, dlse, *, causal):
    attention = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                                  implementation="cuda")
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp((dout, dlse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim,seqlen_q,seqlen_k", [
    (64, 17, 17), (64, 257, 113), (64, 113, 257), (128, 1025, 1025), (40, 257, 113)])
def test_grads(seed, head_dim, seqlen_q, seqlen_k, heads, kv_heads, dtype, causal):
    """dq, and dk, dv summed over each group, against the oracle's; with an lse cotangent."""
    require_kernel(head_dim)
    q, k, v = _random_gqa(seed, 2, seqlen_q, seqlen_k, heads, kv_heads, head_dim, DTYPES[dtype])
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (2, heads, seqlen_q), jnp.float32)
    if causal and seqlen_q > seqlen_k:  # rows that see no key: lse -inf, dlse must be 0 there
        dlse = dlse.at[:, :, :seqlen_q - seqlen_k].set(0)
    grads = run_on_poisoned_memory(functools.partial(_kernel_grads, causal=causal),
                                   q, k, v, dout, dlse)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    assert_grads_within_rule(grads, q, k, v, dout, dlse, causal=causal, slack=SLACK)


def test_gqa_runs_both_kernels():
    require_kernel(128)
    q = jax.ShapeDtypeStruct((2, 256, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jax_flash.flash_attention(
        q, k, v, causal=True).astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert "jax_flash_fwd" in compiled and "jax_flash_bwd" in compiled
