"""ALiBi in the CUDA kernels (implementation="cuda"): out, lse and the gradients dq, dk, dv and
dalibi_slopes against the float32 oracle with the same slopes, held to test_kernel_masks_gpu's
rule (twice the error of the same dense computation in the inputs' dtype, plus the oracle's
rounding, SLACK and TINY); GPU only.

The forward and the gradients run as two computations on poisoned memory. Slopes are the usual
geometric ones (2^(-8(i + 1) / heads)) or per-batch random ones: biases from a few units to
hundreds over these lengths, so some rows are nearly one-hot and others nearly flat.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import TINY, random_normal
from test_bwd_gpu import SLACK
from test_fwd_gpu import EPSILON, LSE_ATOL, LSE_RTOL, require_kernel, run_on_poisoned_memory
from test_fwd_gpu import seed  # noqa: F401  a fixture
from test_kernel_masks_gpu import _bound, _inputs, _segment_ids

pytestmark = pytest.mark.gpu

NAMES = ("out", "lse", "dq", "dk", "dv", "dalibi_slopes")


def _geometric_slopes(heads: int):
    return jnp.asarray([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], jnp.float32)


def _attention(attention, q, k, v, slopes, q_ids, **options):
    return attention(q, k, v, alibi_slopes=slopes, q_segment_ids=q_ids, kv_segment_ids=q_ids,
                     **options)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "deterministic"))
def _flash(q, k, v, slopes, q_ids, **options):
    return _attention(jax_flash.flash_attention, q, k, v, slopes, q_ids, return_lse=True,
                      implementation="cuda", **options)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "deterministic"))
def _flash_grads(q, k, v, slopes, q_ids, dout, dlse, **options):
    _, vjp = jax.vjp(lambda q, k, v, s: _flash(q, k, v, s, q_ids, **options), q, k, v, slopes)
    return vjp((dout, dlse))


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "compute_dtype"))
def _reference(q, k, v, slopes, q_ids, dout, dlse, *, compute_dtype, **options):
    """(out, lse, dq, dk, dv, dalibi_slopes, dlse) of dense attention_reference in compute_dtype;
    dlse gets 0 on rows that see no key (lse's derivative is NaN there)."""
    def attention(q, k, v, slopes):
        return _attention(jax_flash.attention_reference, q, k, v, slopes, q_ids,
                          compute_dtype=compute_dtype, **options)

    (out, lse), vjp = jax.vjp(attention, *(x.astype(compute_dtype) for x in (q, k, v)), slopes)
    dlse = jnp.where(jnp.isneginf(lse), 0, dlse)
    return (out, lse, *vjp((dout.astype(compute_dtype), dlse)), dlse)


def _max_error(got, want):
    return np.abs(got - want).max(initial=0)


def assert_within_rule(names, flash, oracle, dense, dtypes) -> float:
    """out, lse, then the gradients (names[2:], result dtypes `dtypes`) of the kernels against
    the float32 oracle with FlashAttention's rule; returns out's bound."""
    for name, got, want in zip(names, flash, oracle):
        assert got.shape == want.shape, name
        assert not np.isnan(got).any(), f"{np.isnan(got).sum()} NaN in {name} (unwritten?)"

    error, out_bound = _max_error(flash[0], oracle[0]), 2 * _max_error(dense[0], oracle[0]) + EPSILON
    assert error <= out_bound, f"max |out - oracle| = {error:.3e} > {out_bound:.3e}"
    finite = ~np.isneginf(oracle[1])
    np.testing.assert_array_equal(np.isneginf(flash[1]), ~finite, "lse -inf rows differ")
    np.testing.assert_allclose(flash[1][finite], oracle[1][finite], rtol=LSE_RTOL, atol=LSE_ATOL,
                               err_msg="lse")
    for name, got, want, low, dtype in zip(names[2:], flash[2:], oracle[2:], dense[2:], dtypes):
        error, baseline = _max_error(got, want), _max_error(low, want)
        rounding = _max_error(want.astype(dtype).astype(np.float32), want)
        bound = 2 * baseline + rounding + SLACK * np.abs(want).max(initial=0) + TINY
        assert error <= bound, (f"max |{name} - oracle| = {error:.3e} > 2 × {baseline:.3e} "
                                f"(dense, {jnp.dtype(dtype).name}) + {rounding:.3e} + slack")
    return out_bound


def _check(seed, q, k, v, slopes, q_ids=None, *, deterministic=False, **options):
    batch, seqlen_q, heads, _ = q.shape
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32)
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.device_put((q, k, v, slopes, q_ids, dout, dlse), cpu)
    *oracle, dlse = _reference(*on_cpu, compute_dtype=jnp.float32, **options)
    *dense, _ = _reference(*on_cpu, compute_dtype=q.dtype, **options)
    dlse = jax.device_put(dlse, q.devices().pop())

    def run():
        out, lse = run_on_poisoned_memory(_bound(_flash, **options, deterministic=deterministic),
                                          q, k, v, slopes, q_ids)
        grads = run_on_poisoned_memory(_bound(_flash_grads, **options, deterministic=deterministic),
                                       q, k, v, slopes, q_ids, dout, dlse)
        return [np.asarray(x, np.float32) for x in (out, lse, *grads)]

    flash = run()
    oracle, dense = ([np.asarray(x, np.float32) for x in r] for r in (oracle, dense))
    # dalibi_slopes is float32, but the oracle's rounding to q's dtype is the slack it gets.
    out_bound = assert_within_rule(NAMES, flash, oracle, dense, [q.dtype] * 4)

    # A kernel that ignored the slopes would miss the oracle by far.
    unbiased = _reference(*on_cpu[:3], jnp.zeros_like(on_cpu[3]), *on_cpu[4:],
                          compute_dtype=jnp.float32, **options)[0]
    assert _max_error(flash[0], np.asarray(unbiased)) > 10 * out_bound

    if deterministic:
        for name, a, b in zip(NAMES, flash, run()):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between two runs")


# (slopes, causal, window_size, softcap, seqlen_q, seqlen_k, head_dim, dtype, heads, kv_heads,
# deterministic)
CASES = [
    ("geometric", True, (-1, -1), 0.0, 1025, 1025, 128, "bf16", 4, 4, False),
    ("per_batch", False, (-1, -1), 0.0, 97, 1025, 64, "fp16", 8, 2, False),   # sq < sk, GQA
    ("geometric", True, (-1, -1), 0.0, 1025, 97, 256, "bf16", 2, 2, False),   # rows see no key
    ("per_batch", False, (100, 30), 5.0, 1025, 700, 64, "bf16", 2, 2, False),  # band and cap
    ("geometric", False, (-1, -1), 0.0, 1, 1025, 128, "fp16", 2, 1, False),   # one query, MQA
    ("per_batch", True, (200, -1), 0.0, 1025, 1025, 128, "bf16", 2, 2, True),
    ("geometric", False, (-1, -1), 30.0, 333, 333, 96, "bf16", 4, 2, True),
]


@pytest.mark.parametrize(
    "slopes,causal,window_size,softcap,seqlen_q,seqlen_k,head_dim,dtype,heads,kv_heads,"
    "deterministic", CASES,
    ids=[f"{s}-{'causal' if c else 'full'}-w{w[0]}_{w[1]}-cap{cap:g}-{sq}x{sk}-d{d}-{t}-h{h}kv{hk}"
         + ("-det" if det else "") for s, c, w, cap, sq, sk, d, t, h, hk, det in CASES])
def test_alibi(seed, slopes, causal, window_size, softcap, seqlen_q, seqlen_k, head_dim, dtype,
               heads, kv_heads, deterministic):
    require_kernel(head_dim)
    batch = 2
    q, k, v = _inputs(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    if slopes == "geometric":
        alibi = _geometric_slopes(heads)
    else:
        alibi = jnp.asarray(np.random.default_rng(seed).uniform(0.01, 0.3, (batch, heads)),
                            jnp.float32)
    _check(seed, q, k, v, alibi, causal=causal, window_size=window_size, softcap=softcap,
           deterministic=deterministic)


@pytest.mark.parametrize("pattern", ["packed", "padding_inside"])
def test_alibi_with_segment_ids(seed, pattern):
    """ALiBi's distance counts whole-row indices, segment ids only mask."""
    require_kernel(128)
    q_ids, _ = _segment_ids(pattern)
    q, k, v = _inputs(seed, 2, q_ids.shape[1], q_ids.shape[1], 2, 2, 128, "bf16")
    _check(seed, q, k, v, _geometric_slopes(2), q_ids, causal=True, window_size=(-1, -1),
           softcap=0.0)
