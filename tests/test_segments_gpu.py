"""Segment ids and flash_attention_varlen on a GPU (the XLA path until the kernels learn them):
bfloat16 forward and gradients against the float32 oracle on each segment or sequence, held to
"no worse than twice the same dense computation in bfloat16, plus the oracle's rounding"; GPU
only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import TINY, random_normal
from test_segments_cpu import _ids, per_sequence_oracle

pytestmark = pytest.mark.gpu

SLACK = 1e-3  # times the largest entry of the oracle's result


def _assert_within_rule(name, got, oracle, dense):
    got, oracle, dense = (np.asarray(x, np.float32) for x in (got, oracle, dense))
    finite = np.isfinite(oracle)  # lse of rows that see nothing: -inf in both
    np.testing.assert_array_equal(got[~finite], oracle[~finite], err_msg=name)
    got, oracle, dense = got[finite], oracle[finite], dense[finite]
    assert not np.isnan(got).any(), name
    error = np.abs(got - oracle).max(initial=0)
    rounding = np.abs(oracle.astype(jnp.bfloat16).astype(np.float32) - oracle).max(initial=0)
    bound = (2 * np.abs(dense - oracle).max(initial=0) + rounding
             + SLACK * np.abs(oracle).max(initial=0) + TINY)
    assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e}"


def _bf16(seed, shape):
    return random_normal(seed, shape, jnp.bfloat16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_segment_ids(causal):
    """Two rows over several 128-token tiles with GQA: segments across tile boundaries, a
    single-token segment and padding, against the dense oracle given the same ids."""
    batch, seqlen, heads, kv_heads, head_dim = 2, 333, 8, 2, 64
    ids = _ids([(0, 1), (1, 200), (2, 100), (-1, 32)], [(5, 129), (6, 204)])
    q = _bf16(0, (batch, seqlen, heads, head_dim))
    k, v = (_bf16(s, (batch, seqlen, kv_heads, head_dim)) for s in (1, 2))
    dout = _bf16(3, q.shape)
    dlse = random_normal(4, (batch, heads, seqlen), jnp.float32)

    def run(attention, dtype, **options):
        def f(q, k, v):
            out, lse = attention(q, k, v, causal=causal, q_segment_ids=ids, **options)
            return out.astype(dtype), lse

        outputs, vjp = jax.vjp(f, *(x.astype(dtype) for x in (q, k, v)))
        return (*outputs, *vjp((dout.astype(dtype), dlse)))

    flash = run(jax_flash.flash_attention, jnp.bfloat16, return_lse=True)
    oracle = run(jax_flash.attention_reference, jnp.float32)
    dense = run(jax_flash.attention_reference, jnp.bfloat16, compute_dtype=jnp.bfloat16)
    for name, *results in zip(("out", "lse", "dq", "dk", "dv"), flash, oracle, dense):
        _assert_within_rule(name, *results)
    padding = np.asarray(ids < 0)
    assert (np.asarray(flash[0])[padding] == 0).all()
    assert (np.asarray(flash[2])[padding] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(causal):
    """Sequences of 0 to 300 tokens, queries and keys of different lengths, each aligned at its
    own bottom right, against dense attention on each sequence alone."""
    heads, kv_heads, head_dim = 8, 2, 128
    cu_q = np.array([0, 1, 1, 201, 461, 761])
    cu_k = np.array([0, 1, 50, 333, 460, 760])
    q = _bf16(10, (cu_q[-1], heads, head_dim))
    k, v = (_bf16(s, (cu_k[-1], kv_heads, head_dim)) for s in (11, 12))
    dout = _bf16(13, q.shape)
    dlse = random_normal(14, (heads, cu_q[-1]), jnp.float32)
    if causal:  # sequence 3 has more queries than keys: its first ones see nothing
        dlse = dlse.at[:, 201:334].set(0)

    def f(q, k, v):
        out, lse = jax_flash.flash_attention_varlen(q, k, v, cu_q, cu_k, 300, 300, causal=causal,
                                                    return_lse=True)
        return out, lse

    (out, lse), vjp = jax.vjp(f, q, k, v)
    flash = (out, lse.T, *vjp((dout, dlse)))
    sequences = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(
        cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]) if b > a and d > c]
    pieces = [(q[rows], k[keys], v[keys], dout[rows], dlse[:, rows]) for rows, keys in sequences]
    oracle = per_sequence_oracle([tuple(x.astype(jnp.float32) for x in piece) for piece in pieces],
                                 causal=causal)
    dense = per_sequence_oracle(pieces, causal=causal, compute_dtype=jnp.bfloat16)
    for (rows, keys), expected, baseline in zip(sequences, oracle, dense):
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            index = keys if name in ("dk", "dv") else rows
            want, base = expected[i], baseline[i]
            if name == "lse":
                want, base = want.T, base.T
            _assert_within_rule(name, flash[i][index], want, base)
