"""Dropout in the CUDA kernels (implementation="cuda"): out, lse, dq, dk and dv against the
float32 oracle given the mask _dropout defines (the kernels draw that very mask), held to
test_kernel_alibi_gpu's rule; GPU only.

The forward and the gradients run as two computations on poisoned memory. A kernel drawing any
other mask, or none, misses the oracle by far; the backward must regenerate the forward's mask
for the gradients to match. Rates 0.1-0.5 over causal, windows, softcap, ALiBi, GQA/MQA, head
dims 64/128/256 and 96 (zero-padded), odd and unequal seqlens, segment ids and deterministic mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import random_normal
from jax_flash._dropout import dense_keep_mask, quantize_rate
from test_fwd_gpu import require_kernel, run_on_poisoned_memory
from test_fwd_gpu import seed  # noqa: F401  a fixture
from test_kernel_alibi_gpu import _max_error, assert_within_rule
from test_kernel_masks_gpu import _bound, _inputs, _segment_ids

pytestmark = pytest.mark.gpu

NAMES = ("out", "lse", "dq", "dk", "dv")
STATIC = ("causal", "window_size", "softcap", "deterministic", "rate")


def _options(q_ids, slopes, rate, **options):
    return dict(q_segment_ids=q_ids, kv_segment_ids=q_ids, alibi_slopes=slopes,
                dropout_rate=rate, **options)


@functools.partial(jax.jit, static_argnames=STATIC)
def _flash(q, k, v, rng, q_ids, slopes, *, rate, **options):
    options = _options(q_ids, slopes, rate, **options)
    return jax_flash.flash_attention(q, k, v, dropout_rng=rng, return_lse=True,
                                     implementation="cuda", **options)


@functools.partial(jax.jit, static_argnames=STATIC)
def _flash_grads(q, k, v, rng, q_ids, slopes, dout, dlse, **options):
    _, vjp = jax.vjp(lambda q, k, v: _flash(q, k, v, rng, q_ids, slopes, **options), q, k, v)
    return vjp((dout, dlse))


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "rate",
                                             "compute_dtype"))
def _reference(q, k, v, keep, q_ids, slopes, dout, dlse, *, rate, compute_dtype, **options):
    """(out, lse, dq, dk, dv, dlse) of dense attention_reference with the keep mask `keep` (None:
    no dropout) in compute_dtype; dlse gets 0 on rows that see no key."""
    def attention(q, k, v):
        return jax_flash.attention_reference(
            q, k, v, dropout_keep=keep, compute_dtype=compute_dtype,
            **_options(q_ids, slopes, quantize_rate(rate), **options))

    (out, lse), vjp = jax.vjp(attention, *(x.astype(compute_dtype) for x in (q, k, v)))
    dlse = jnp.where(jnp.isneginf(lse), 0, dlse)
    return (out, lse, *vjp((dout.astype(compute_dtype), dlse)), dlse)


def _check(seed, q, k, v, *, rate, q_ids=None, slopes=None, deterministic=False, **options):
    batch, seqlen_q, heads, _ = q.shape
    rng = jax.random.key(seed)
    keep = dense_keep_mask(rng, rate, batch=batch, heads=heads, seqlen_q=seqlen_q,
                           seqlen_k=k.shape[1])
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32)
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.device_put((q, k, v, keep, q_ids, slopes, dout, dlse), cpu)
    *oracle, dlse = _reference(*on_cpu, rate=rate, compute_dtype=jnp.float32, **options)
    *dense, _ = _reference(*on_cpu, rate=rate, compute_dtype=q.dtype, **options)
    dlse = jax.device_put(dlse, q.devices().pop())
    flash_options = dict(options, rate=rate, deterministic=deterministic)

    def run():
        out, lse = run_on_poisoned_memory(_bound(_flash, **flash_options), q, k, v, rng, q_ids,
                                          slopes)
        grads = run_on_poisoned_memory(_bound(_flash_grads, **flash_options), q, k, v, rng, q_ids,
                                       slopes, dout, dlse)
        return [np.asarray(x, np.float32) for x in (out, lse, *grads)]

    flash = run()
    oracle, dense = ([np.asarray(x, np.float32) for x in r] for r in (oracle, dense))
    out_bound = assert_within_rule(NAMES, flash, oracle, dense, [q.dtype] * 3)

    # Without dropout, or with another key's mask, the oracle is far from the kernels' output.
    no_dropout = _reference(*on_cpu[:3], None, *on_cpu[4:], rate=0.0,
                            compute_dtype=jnp.float32, **options)[0]
    other_keep = dense_keep_mask(jax.random.key(seed + 1), rate, batch=batch, heads=heads,
                                 seqlen_q=seqlen_q, seqlen_k=k.shape[1])
    other_mask = _reference(*on_cpu[:3], jax.device_put(other_keep, cpu), *on_cpu[4:], rate=rate,
                            compute_dtype=jnp.float32, **options)[0]
    for wrong in (no_dropout, other_mask):
        assert _max_error(flash[0], np.asarray(wrong)) > 10 * out_bound

    if deterministic:
        for name, a, b in zip(NAMES, flash, run()):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between two runs")


# (rate, causal, window_size, softcap, alibi, seqlen_q, seqlen_k, head_dim, dtype, heads,
# kv_heads, deterministic)
CASES = [
    (0.2, False, (-1, -1), 0.0, False, 1025, 1025, 128, "bf16", 4, 4, False),
    (0.1, True, (-1, -1), 0.0, False, 97, 1025, 64, "fp16", 8, 2, False),     # sq < sk, GQA
    (0.5, True, (-1, -1), 0.0, False, 1025, 97, 256, "bf16", 2, 2, False),    # rows see no key
    (0.3, False, (100, 30), 5.0, False, 1025, 700, 64, "bf16", 2, 2, False),  # band and cap
    (0.2, False, (-1, -1), 0.0, True, 1, 1025, 128, "fp16", 2, 1, False),     # one query, MQA
    (0.25, True, (200, -1), 0.0, True, 1025, 1025, 128, "bf16", 2, 2, True),
    (0.15, False, (-1, -1), 30.0, False, 333, 333, 96, "bf16", 4, 2, True),
    (0.2, False, (-1, -1), 0.0, False, 17, 17, 64, "bf16", 3, 3, False),
]


@pytest.mark.parametrize(
    "rate,causal,window_size,softcap,alibi,seqlen_q,seqlen_k,head_dim,dtype,heads,kv_heads,"
    "deterministic", CASES,
    ids=[f"p{p:g}-{'causal' if c else 'full'}-w{w[0]}_{w[1]}-cap{cap:g}" + ("-alibi" if a else "")
         + f"-{sq}x{sk}-d{d}-{t}-h{h}kv{hk}" + ("-det" if det else "")
         for p, c, w, cap, a, sq, sk, d, t, h, hk, det in CASES])
def test_dropout(seed, rate, causal, window_size, softcap, alibi, seqlen_q, seqlen_k, head_dim,
                 dtype, heads, kv_heads, deterministic):
    require_kernel(head_dim)
    q, k, v = _inputs(seed, 2, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    slopes = (jnp.asarray([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], jnp.float32)
              if alibi else None)
    _check(seed, q, k, v, rate=rate, slopes=slopes, causal=causal, window_size=window_size,
           softcap=softcap, deterministic=deterministic)


def test_dropout_with_segment_ids(seed):
    require_kernel(128)
    q_ids, _ = _segment_ids("packed")
    q, k, v = _inputs(seed, 2, q_ids.shape[1], q_ids.shape[1], 2, 2, 128, "bf16")
    _check(seed, q, k, v, rate=0.2, q_ids=q_ids, causal=True, window_size=(-1, -1), softcap=0.0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_with_mask_and_bias(seed, deterministic):
    """With a mask and a bias shared by the heads, the kernels run both passes; deterministic
    pairs the kernel forward with the XLA backward (the kernel adds the gradient of a bias that
    broadcasts atomically). Either way both passes draw the same dropout mask, so the gradients
    match the oracle."""
    require_kernel(64)
    batch, seqlen, heads, rate = 2, 300, 2, 0.2
    q, k, v = _inputs(seed, batch, seqlen, seqlen, heads, heads, 64, "bf16")
    mask = jnp.asarray(np.random.default_rng(seed).random((batch, 1, seqlen, seqlen)) < 0.8)
    bias = random_normal(seed + 3, (batch, 1, seqlen, seqlen), jnp.float32)
    rng = jax.random.key(seed)
    keep = dense_keep_mask(rng, rate, batch=batch, heads=heads, seqlen_q=seqlen, seqlen_k=seqlen)

    def flash(q, k, v, bias):
        return jax_flash.flash_attention(
            q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=rng,
            deterministic=deterministic, implementation=None if deterministic else "cuda")

    def oracle(q, k, v, bias):
        return jax_flash.attention_reference(q, k, v, mask=mask, bias=bias,
                                             dropout_rate=quantize_rate(rate),
                                             dropout_keep=keep, compute_dtype=jnp.float32)[0]

    dout = random_normal(seed + 1, q.shape, jnp.float32)
    results = []
    for fn in (flash, oracle):
        out, vjp = jax.vjp(fn, q, k, v, bias)
        results.append([np.asarray(x, np.float32) for x in (out, *vjp(dout.astype(out.dtype)))])
    for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), *results):
        scale = np.abs(want).max()
        assert _max_error(got, want) <= 0.02 * scale, name
