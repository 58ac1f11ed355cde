"""flash_attention_varlen on the XLA path: packed sequences (empty ones, single tokens, more
queries than keys) against dense float32 attention on each sequence alone, forward and
gradients, with each sequence aligned at its own bottom right; tiles smaller than a sequence;
jit, vmap and grad; bad cu_seqlens."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flash
from grad_oracle import random_normal
from jax_flash._blockwise import blockwise_attention
from jax_flash._blockwise_bwd import blockwise_attention_bwd
from jax_flash._varlen import _sequence_layout
from test_segments_cpu import per_sequence_oracle

ATOL = RTOL = 2e-5

# Sequence lengths (query, key): 3/5; 0/4 (no query); 1/0 (a query with no key); 13/3 (causal
# hides the first 10 queries); 6/18; 0/0.
CU_SEQLENS_Q = np.array([0, 3, 3, 4, 17, 23, 23])
CU_SEQLENS_K = np.array([0, 5, 9, 9, 12, 30, 30])
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _packed(seed, total_q=23, total_k=30):
    q = random_normal(seed, (total_q, HEADS, HEAD_DIM), jnp.float32)
    k = random_normal(seed + 1, (total_k, KV_HEADS, HEAD_DIM), jnp.float32)
    v = random_normal(seed + 2, (total_k, KV_HEADS, HEAD_DIM), jnp.float32)
    dout = random_normal(seed + 3, q.shape, jnp.float32)
    dlse = random_normal(seed + 4, (HEADS, total_q), jnp.float32)
    return q, k, v, dout, dlse


OPTIONS = {
    "causal": {"causal": True},
    "window_alibi_softcap": {"window_size": (4, 2), "softcap": 2.0,
                             "alibi_slopes": np.linspace(0.1, 0.5, HEADS, dtype=np.float32)},
}


@pytest.mark.parametrize("case", OPTIONS)
def test_each_sequence_attends_alone(case):
    options = OPTIONS[case]
    q, k, v, dout, dlse = _packed(0)
    # Rows that see no key have lse -inf: the dense oracle's gradient needs dlse 0 there.
    dlse = dlse.at[:, 4:17].set(0)
    varlen = functools.partial(jax_flash.flash_attention_varlen, cu_seqlens_q=CU_SEQLENS_Q,
                               cu_seqlens_k=CU_SEQLENS_K, max_seqlen_q=13, max_seqlen_k=18,
                               return_lse=True, **options)
    (out, lse), vjp = jax.vjp(varlen, q, k, v)
    flash = (out, lse.T, *vjp((dout, dlse)))  # lse: [total_q, heads] like the rest

    bounds = zip(CU_SEQLENS_Q[:-1], CU_SEQLENS_Q[1:], CU_SEQLENS_K[:-1], CU_SEQLENS_K[1:])
    sequences = [(slice(a, b), slice(c, d)) for a, b, c, d in bounds if b > a and d > c]
    oracle = per_sequence_oracle(
        [(q[rows], k[keys], v[keys], dout[rows], dlse[:, rows]) for rows, keys in sequences],
        **options)
    for (rows, keys), expected in zip(sequences, oracle):
        expected = (expected[0], expected[1].T, *expected[2:])
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), flash, expected):
            index = keys if name in ("dk", "dv") else rows
            np.testing.assert_allclose(got[index], want, atol=ATOL, rtol=RTOL, err_msg=name)
    # The query of the sequence without keys sees nothing; the keys without queries get no
    # gradient.
    assert (out[3] == 0).all() and np.isneginf(lse[:, 3]).all() and (flash[2][3] == 0).all()
    assert (flash[3][5:9] == 0).all() and (flash[4][5:9] == 0).all()


def test_tiles_smaller_than_the_sequences():
    """The blockwise path with 4 x 8 tiles, most of them crossing sequence boundaries and many
    skipped, gives what one tile gives: forward and backward."""
    q, k, v, dout, dlse = _packed(10)
    dlse = dlse.at[:, 4:17].set(0)
    (q_ids, q_positions), (kv_ids, kv_positions) = (
        _sequence_layout(jnp.asarray(cu), total) for cu, total in ((CU_SEQLENS_Q, 23),
                                                                    (CU_SEQLENS_K, 30)))
    extras = (q_ids[None], kv_ids[None], q_positions[None], kv_positions[None])
    options = {"causal": True, "softmax_scale": 1 / math.sqrt(HEAD_DIM), "has_segment_ids": True,
               "has_positions": True}

    @functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
    def forward_and_backward(block_q, block_k):
        out, lse = blockwise_attention(q[None], k[None], v[None], *extras, block_q=block_q,
                                       block_k=block_k, **options)
        grads = blockwise_attention_bwd(q[None], k[None], v[None], out, lse, dout[None],
                                        dlse[None], *extras, block_q=block_q, block_k=block_k,
                                        **options)
        return out, lse, *grads

    small = forward_and_backward(4, 8)
    whole = forward_and_backward(32, 32)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), small, whole):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)
    varlen = jax_flash.flash_attention_varlen(q, k, v, CU_SEQLENS_Q, CU_SEQLENS_K, 13, 18,
                                              causal=True)
    np.testing.assert_allclose(small[0][0], varlen, atol=ATOL, rtol=RTOL)


def test_jit_vmap_and_grad():
    """Two packed rows with their own cu_seqlens, mapped on axis 1 of q and axis 0 of
    cu_seqlens, under jit and grad, against each row alone."""
    q, k, v, _, _ = _packed(20, total_q=9, total_k=9)
    q2, k2, v2, _, _ = _packed(30, total_q=9, total_k=9)
    cu = jnp.asarray([[0, 2, 2, 9], [0, 1, 5, 9]], jnp.int32)

    def loss(q, k, v, cu):
        out = jax_flash.flash_attention_varlen(q, k, v, cu, cu, 9, 9, causal=True)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    mapped = jax.jit(jax.vmap(grad, in_axes=(1, 1, 1, 0), out_axes=1))(
        jnp.stack([q, q2], 1), jnp.stack([k, k2], 1), jnp.stack([v, v2], 1), cu)
    for i, inputs in enumerate(((q, k, v), (q2, k2, v2))):
        for name, got, want in zip(("dq", "dk", "dv"), mapped, grad(*inputs, cu[i])):
            np.testing.assert_allclose(got[:, i], want, atol=ATOL, rtol=RTOL, err_msg=name)


def test_check_grads():
    q, k, v, _, _ = _packed(40, total_q=6, total_k=7)
    f = functools.partial(jax_flash.flash_attention_varlen, cu_seqlens_q=np.array([0, 1, 4, 4, 6]),
                          cu_seqlens_k=np.array([0, 2, 4, 5, 7]), max_seqlen_q=3,
                          max_seqlen_k=2, causal=True)
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("cu_q, cu_k, max_q, error, match", [
    ([0, 4, 2, 5], [0, 2, 4, 6], 9, ValueError, r"cu_seqlens_q must start at 0 and never decrease"),
    ([1, 2, 5], [0, 2, 6], 9, ValueError, "cu_seqlens_q must start at 0"),
    ([0, 2, 4], [0, 2, 6], 9, ValueError, r"cu_seqlens_q\[-1\] = 4 must equal .* 5"),
    ([0, 2, 5], [0, 2, 7], 9, ValueError, r"cu_seqlens_k\[-1\] = 7 must equal .* 6"),
    ([0, 2, 5], [0, 6], 9, ValueError, "the same number of sequences"),
    ([0, 2, 5], [0, 2, 6], 2, ValueError, "a sequence of 3 tokens, longer than max_seqlen_q = 2"),
    ([0.0, 5.0], [0, 6], 9, TypeError, "cu_seqlens_q must be an integer array"),
    ([[0, 5]], [0, 6], 9, ValueError, r"cu_seqlens_q must be 1-D"),
    ([0, 5], [0, 6], 0, TypeError, "max_seqlen_q must be a static int >= 1"),
])
def test_bad_cu_seqlens(cu_q, cu_k, max_q, error, match):
    q, k, v, _, _ = _packed(50, total_q=5, total_k=6)
    with pytest.raises(error, match=match):
        jax_flash.flash_attention_varlen(q, k, v, np.array(cu_q), np.array(cu_k), max_q, 9)


def test_bad_packed_shapes():
    q, k, v, _, _ = _packed(60, total_q=5, total_k=6)
    cu_q, cu_k = np.array([0, 5]), np.array([0, 6])
    with pytest.raises(ValueError, match=r"q packed as 3-D \[total_tokens, heads, head_dim\]"):
        jax_flash.flash_attention_varlen(q[None], k, v, cu_q, cu_k, 5, 6)
    with pytest.raises(ValueError, match=r"alibi_slopes \[heads\] = \[4\]"):
        jax_flash.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 6,
                                         alibi_slopes=jnp.ones((1, HEADS)))
    # The kernels run varlen and ALiBi, not the two together (distances within each sequence).
    with pytest.raises(ValueError, match="cannot run alibi_slopes with flash_attention_varlen: "):
        jax_flash.flash_attention_varlen(*(x.astype(jnp.bfloat16) for x in (q, k, v)), cu_q,
                                         cu_k, 5, 6, alibi_slopes=jnp.ones((HEADS,)),
                                         implementation="cuda")
