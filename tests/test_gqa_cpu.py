"""Grouped-query and multi-query attention (k, v with fewer heads than q) on the XLA path: forward
and gradients against the oracle, the grouping order, and the CUDA lowering's GQA contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import _extension
from test_features_cpu import ATOL, RTOL, assert_matches_oracle, make_inputs


def test_mqa_matches_oracle():
    """One kv head for every query head, causal, seqlen_q > seqlen_k. (GQA with groups of 2 runs
    against the oracle with every feature in test_features_cpu.)"""
    q, k, v = make_inputs(0, 2, 29, 17, 4, 1, 8)
    assert_matches_oracle(q, k, v, {}, causal=True)


def test_same_as_repeated_kv_heads_in_order():
    """Query head i uses kv head i // group: out and dq equal plain attention with each kv head
    repeated for its group, and dk, dv are the sums of the repeated heads' gradients."""
    q, k, v = make_inputs(2, 1, 11, 7, 6, 3, 8)
    loss = lambda q, k, v: jnp.sum(jnp.sin(jax_flash.flash_attention(q, k, v, causal=True)))
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, (dq, dk, dv) = grads(q, k, v)
    value_rep, (dq_rep, dk_rep, dv_rep) = grads(q, jnp.repeat(k, 2, axis=2),
                                                jnp.repeat(v, 2, axis=2))
    np.testing.assert_allclose(value, value_rep, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(dq, dq_rep, atol=ATOL, rtol=RTOL)
    for grad, rep in ((dk, dk_rep), (dv, dv_rep)):
        assert grad.shape == k.shape
        np.testing.assert_allclose(grad, rep.reshape(1, 7, 3, 2, 8).sum(3), atol=ATOL, rtol=RTOL)


needs_kernels = pytest.mark.skipif(
    not _extension.kernels_built(),
    reason=f"jax-flash has no CUDA kernels here: {_extension.why_no_kernels()}")


@needs_kernels
def test_cuda_lowering_passes_kv_heads_to_both_kernels():
    """GQA runs on the kernels: k and v go in with their own heads, dk and dv come out per query
    head and are summed in XLA."""
    q = jax.ShapeDtypeStruct((2, 128, 8, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 96, 2, 64), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jax_flash.flash_attention(
        q, k, v, causal=True, implementation="cuda").astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    forward = [line for line in hlo.splitlines() if "custom_call @jax_flash_fwd(" in line]
    backward = [line for line in hlo.splitlines() if "custom_call @jax_flash_bwd(" in line]
    assert len(forward) == 1 and len(backward) == 1
    assert "tensor<2x96x2x64xbf16>" in forward[0]
    assert "tensor<2x96x2x64xbf16>" in backward[0]  # k, v in
    assert "tensor<2x96x8x64xbf16>" in backward[0].split("->")[1]  # dk, dv out per query head
