"""Numerics of the blockwise XLA path against the dense float32 oracle."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash._blockwise import blockwise_attention

# (seqlen_q, seqlen_k): single tokens, sizes that no block divides, and sq != sk both ways.
SEQLENS = [(1, 1), (17, 17), (97, 97), (130, 130), (17, 130), (130, 17), (1, 97), (97, 1)]


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k"))
def _blockwise(q, k, v, *, causal, **blocks):
    scale = 1.0 / math.sqrt(q.shape[3])
    return blockwise_attention(q, k, v, causal=causal, softmax_scale=scale, **blocks)


reference = jax.jit(jax_flash.attention_reference, static_argnames=("causal", "compute_dtype"))


def _max_error(x, ref):
    """Largest |x - ref| over the entries where ref is finite (lse is -inf on empty rows)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(x), finite)
    return np.abs(x[finite] - ref[finite]).max(initial=0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_float32_matches_oracle(make_qkv, seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 3, 40)
    # Tiles small enough that the longer sequences span several, the last one padded.
    out, lse = _blockwise(q, k, v, causal=causal, block_q=32, block_k=48)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (2, 3, seqlen_q)
    assert _max_error(out, ref_out) <= 1e-5
    assert _max_error(lse, ref_lse) <= 1e-5


@pytest.mark.parametrize("head_dim", [64, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(make_qkv, head_dim, causal):
    q, k, v = make_qkv(1, 97, 130, 2, head_dim, seed=head_dim)
    out, lse = _blockwise(q, k, v, causal=causal)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    assert _max_error(out, ref_out) <= 1e-5
    assert _max_error(lse, ref_lse) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,dtype", [
    (97, 97, 64, jnp.bfloat16),
    (17, 130, 40, jnp.bfloat16),
    (130, 17, 100, jnp.bfloat16),
    (97, 130, 40, jnp.float16),
])
def test_low_precision_within_twice_dense_error(make_qkv, dtype, causal, seqlen_q, seqlen_k,
                                                head_dim):
    """FlashAttention's bar: no worse than twice the dense computation in the same dtype."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 2, head_dim, dtype)
    out, lse = _blockwise(q, k, v, causal=causal)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    dense_out, dense_lse = reference(q, k, v, causal=causal, compute_dtype=dtype)
    # Rounding the exact answer to `dtype` is an error no implementation can avoid.
    rounding = _max_error(ref_out.astype(dtype), ref_out)
    assert _max_error(out, ref_out) <= 2 * _max_error(dense_out, ref_out) + rounding
    assert _max_error(lse, ref_lse) <= 2 * _max_error(dense_lse, ref_lse) + 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_that_see_no_key(make_qkv, dtype):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k queries see nothing."""
    q, k, v = make_qkv(2, 130, 17, 2, 40, dtype)
    out, lse = _blockwise(q, k, v, causal=True, block_q=32, block_k=8)
    empty = 130 - 17
    np.testing.assert_array_equal(np.asarray(out[:, :empty], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(lse[:, :, :empty]), -np.inf)
    assert np.all(np.isfinite(np.asarray(lse[:, :, empty:])))
    assert np.all(np.asarray(out[:, empty:], np.float32) != 0.0)


@pytest.mark.parametrize("block_q,block_k,causal", [
    (16, 24, False), (16, 24, True), (7, 5, True), (128, 13, True), (200, 200, False),
])
def test_block_sizes_that_do_not_divide_seqlen(make_qkv, causal, block_q, block_k):
    q, k, v = make_qkv(1, 97, 130, 2, 40)
    out, lse = _blockwise(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    assert _max_error(out, ref_out) <= 1e-5
    assert _max_error(lse, ref_lse) <= 1e-5


def test_float64_stays_float64(make_qkv, x64):
    q, k, v = make_qkv(1, 33, 45, 2, 40, jnp.float64)
    out, lse = _blockwise(q, k, v, causal=True, block_q=16, block_k=16)
    ref_out, ref_lse = reference(q, k, v, causal=True, compute_dtype=jnp.float64)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float32
    assert _max_error(out, ref_out) <= 1e-12
    assert _max_error(lse, ref_lse) <= 1e-6


def test_memory_grows_linearly_with_seqlen():
    """Scratch memory of the compiled XLA path is O(seqlen), never the seqlen² score matrix."""

    def scratch_bytes(seqlen):
        x = jax.ShapeDtypeStruct((1, seqlen, 2, 64), jnp.float32)
        attention = jax.jit(functools.partial(_blockwise, causal=True))
        return attention.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    short, long = scratch_bytes(4096), scratch_bytes(16384)
    assert long <= 5 * short  # 4x the tokens; quadratic memory would grow 16x
    assert long < 16384 * 16384 * 4 // 16  # a sixteenth of one head's float32 scores
