"""Sliding windows, softcap, segment ids and flash_attention_varlen in the CUDA kernels
(implementation="cuda"), forward (out, lse) and gradients (dq, dk, dv), against the float32
oracle given the same options; GPU only.

The bar is FlashAttention's, as in test_fwd_gpu and grad_oracle: out within twice the error of the
same dense computation in the inputs' dtype (attention_reference with the same options and
compute_dtype) plus EPSILON; lse as tight as test_fwd_gpu's, -inf rows included; each gradient
within twice the dense computation's error plus the oracle's rounding, SLACK and TINY. Rows that
see no key must give out 0, lse -inf and dq 0, keys that no query sees dk = dv = 0, exactly.

Each case runs the forward (out, lse) and the gradients (dq, dk, dv, the forward inside) as two
computations, each on poisoned memory (see test_fwd_gpu.run_on_poisoned_memory), so an element a
skipped tile leaves unwritten reads NaN.
The shapes are odd on purpose: tiles are 128 query rows by 64 keys forward, 64 or 128 by 128
backward, and windows and segments start and end inside them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import TINY, random_normal
from test_bwd_gpu import SLACK
from test_fwd_gpu import (DTYPES, EPSILON, LSE_ATOL, LSE_RTOL, require_kernel,  # noqa: F401
                          run_on_poisoned_memory, seed)  # seed: a fixture
from test_segments_cpu import _ids

pytestmark = pytest.mark.gpu

NAMES = ("out", "lse", "dq", "dk", "dv")


def _cpu():
    return jax.devices("cpu")[0]


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype):
    """Standard-normal q, k, v (k and v with kv_heads heads) in the dtype. Drawn with numpy, not
    random_qkv's jax.random, whose every new shape costs a compilation."""
    dtype = DTYPES[dtype]
    q = random_normal(seed, (batch, seqlen_q, heads, head_dim), dtype)
    k, v = (random_normal(seed + i, (batch, seqlen_k, kv_heads, head_dim), dtype) for i in (3, 4))
    return q, k, v


# --- The kernels and the oracle ---------------------------------------------------------------

def _flash(q, k, v, q_ids, kv_ids, *, causal, window_size, softcap, deterministic):
    """(out, lse) of the kernels."""
    return jax_flash.flash_attention(
        q, k, v, causal=causal, window_size=window_size, softcap=softcap,
        deterministic=deterministic, q_segment_ids=q_ids, kv_segment_ids=kv_ids, return_lse=True,
        implementation="cuda")


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "deterministic"))
def _flash_grads(q, k, v, dout, dlse, q_ids, kv_ids, *, causal, window_size, softcap,
                 deterministic):
    """(dq, dk, dv) of the kernels (their forward inside), for cotangents dout and dlse."""
    attention = functools.partial(_flash, q_ids=q_ids, kv_ids=kv_ids, causal=causal,
                                  window_size=window_size, softcap=softcap,
                                  deterministic=deterministic)
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp((dout, dlse))


def _run_flash(forward, grads, q, k, v, dout, dlse, *operands):
    """(out, lse, dq, dk, dv): forward(q, k, v, *operands) and grads(q, k, v, dout, dlse,
    *operands), each its own computation on poisoned memory.

    Two computations, as test_fwd_gpu and test_bwd_gpu run them: one returning out, lse and the
    gradients together gave outputs that missed the poisoned blocks (on an H200, 16 of these 20
    cases, so some without integer operands), so the integer operands stay arguments."""
    out, lse = run_on_poisoned_memory(forward, q, k, v, *operands)
    dq, dk, dv = run_on_poisoned_memory(grads, q, k, v, dout, dlse, *operands)
    return out, lse, dq, dk, dv


@functools.cache
def _bound(fn, **options):
    """fn with these options, one function object per options: cases with equal shapes and
    options (and the second deterministic run) then reuse one compilation."""
    return functools.partial(fn, **options)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "compute_dtype"))
def _reference(q, k, v, dout, dlse, q_ids, kv_ids, mask=None, *, causal, window_size, softcap,
               compute_dtype):
    """(out, lse, dq, dk, dv, dlse) of dense attention_reference in compute_dtype; dlse is the
    given one with 0 on rows that see no key (lse's derivative is NaN there)."""
    def attention(q, k, v):
        return jax_flash.attention_reference(
            q, k, v, causal=causal, window_size=window_size, softcap=softcap,
            q_segment_ids=q_ids, kv_segment_ids=kv_ids, mask=mask, compute_dtype=compute_dtype)

    (out, lse), vjp = jax.vjp(attention, *(x.astype(compute_dtype) for x in (q, k, v)))
    dlse = jnp.where(jnp.isneginf(lse), 0, dlse)
    return (out, lse, *vjp((dout.astype(compute_dtype), dlse)), dlse)


def _max_error(got, want):
    return np.abs(got - want).max(initial=0)


def _assert_within_rule(flash, oracle, dense, dtype):
    """flash, oracle, dense: (out [b, sq, h, d], lse [b, h, sq], dq, dk, dv [b, sk, hk, d])."""
    flash, oracle, dense = ([np.asarray(x, np.float32) for x in results]
                            for results in (flash, oracle, dense))
    for name, got, want in zip(NAMES, flash, oracle):
        assert got.shape == want.shape, name
        assert not np.isnan(got).any(), f"{np.isnan(got).sum()} NaN in {name} (unwritten?)"

    out, ref_out, low_out = flash[0], oracle[0], dense[0]
    error, baseline = _max_error(out, ref_out), _max_error(low_out, ref_out)
    assert error <= 2 * baseline + EPSILON, (
        f"max |out - oracle| = {error:.3e} > 2 × {baseline:.3e} (dense attention in "
        f"{jnp.dtype(dtype).name}) + {EPSILON}")

    lse, ref_lse = flash[1], oracle[1]
    empty_rows = np.isneginf(ref_lse)  # [b, h, sq]: queries that see no key
    np.testing.assert_array_equal(np.isneginf(lse), empty_rows, "lse -inf rows differ")
    np.testing.assert_allclose(lse[~empty_rows], ref_lse[~empty_rows], rtol=LSE_RTOL,
                               atol=LSE_ATOL, err_msg="lse")

    for name, grad, ref, low in zip(NAMES[2:], flash[2:], oracle[2:], dense[2:]):
        error, baseline = _max_error(grad, ref), _max_error(low, ref)
        rounding = _max_error(ref.astype(dtype).astype(np.float32), ref)
        bound = 2 * baseline + rounding + SLACK * np.abs(ref).max(initial=0) + TINY
        assert error <= bound, (
            f"max |{name} - oracle| = {error:.3e} > 2 × {baseline:.3e} (dense attention in "
            f"{jnp.dtype(dtype).name}) + {rounding:.3e} (oracle rounded) + slack + tiny = "
            f"{bound:.3e}")

    # Exact zeros where nothing is seen: rows without keys, keys without queries.
    for name, x in (("out", flash[0]), ("dq", flash[2])):
        assert not x.transpose(0, 2, 1, 3)[empty_rows].any(), f"{name} of rows that see no key"
    unseen_keys = ~(oracle[4] != 0).any(-1) & ~(oracle[3] != 0).any(-1)  # [b, sk, hk]
    for name, x in (("dk", flash[3]), ("dv", flash[4])):
        assert not x[unseen_keys].any(), f"{name} of keys that no query sees"


def _check(seed, q, k, v, q_ids=None, kv_ids=None, *, causal, window_size=(-1, -1),
           softcap=0.0, deterministic=False, must_differ_from=None):
    """Runs the kernels (forward, then gradients) on poisoned memory and holds them to the oracle
    given the same options; returns the kernels' results.

    must_differ_from: oracle options (e.g. without the window) whose answer the kernels' out must
    miss by far: a check that the test would catch a kernel ignoring the option.
    """
    batch, seqlen_q, heads, _ = q.shape
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32)
    on_cpu = jax.device_put((q, k, v, dout, dlse, q_ids, kv_ids), _cpu())
    options = dict(causal=causal, window_size=window_size, softcap=softcap)
    *oracle, dlse = _reference(*on_cpu, **options, compute_dtype=jnp.float32)
    *dense, _ = _reference(*on_cpu, **options, compute_dtype=q.dtype)
    dlse = jax.device_put(dlse, q.devices().pop())  # the oracle's: 0 on rows that see no key

    flash_fns = (_bound(_flash, **options, deterministic=deterministic),
                 _bound(_flash_grads, **options, deterministic=deterministic))
    flash = _run_flash(*flash_fns, q, k, v, dout, dlse, q_ids, kv_ids)
    assert flash[0].dtype == q.dtype and flash[1].dtype == jnp.float32
    _assert_within_rule(flash, oracle, dense, q.dtype)

    if deterministic:  # a second run, on poisoned memory too, gives the same bits
        again = _run_flash(*flash_fns, q, k, v, dout, dlse, q_ids, kv_ids)
        for name, a, b in zip(NAMES, flash, again):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                          err_msg=f"{name} differs between two runs")

    if must_differ_from is not None:
        args = dict(zip(("q_ids", "kv_ids"), on_cpu[5:]), **options)
        args.update(must_differ_from)
        other = _reference(*on_cpu[:5], **args, compute_dtype=jnp.float32)[0]
        out, ref_out, low_out = (np.asarray(x, np.float32) for x in (flash[0], oracle[0],
                                                                      dense[0]))
        bound = 2 * _max_error(low_out, ref_out) + EPSILON
        assert _max_error(out, np.asarray(other)) > 10 * bound, (
            f"the oracle with {must_differ_from} is as close: the test cannot see the option")
    return flash


# --- Sliding windows --------------------------------------------------------------------------

# (window_size, causal, seqlen_q, seqlen_k, head_dim, dtype, heads, kv_heads)
WINDOW_CASES = [
    ((0, 0), False, 257, 113, 64, "bf16", 2, 2),      # one key per row; rows < 144 see none
    ((5, -1), True, 1025, 1025, 128, "fp16", 2, 2),   # 6 keys per row: most tiles skipped
    ((-1, 7), False, 113, 257, 64, "fp16", 2, 2),     # a right bound alone
    ((300, -1), False, 1100, 1037, 64, "bf16", 2, 1),  # a left bound alone; GQA
    ((700, -1), False, 1500, 1500, 256, "bf16", 2, 2),
    ((100, 30), False, 1025, 1025, 64, "bf16", 2, 2),  # a band over tiles, inner ones unmasked
    ((100, 30), True, 257, 113, 40, "bf16", 3, 3),    # causal caps the right; rows < 144 see none
    ((37, 0), True, 113, 257, 256, "bf16", 2, 2),
    ((37, 0), False, 513, 700, 128, "bf16", 8, 2),    # right 0 without causal; GQA
]


@pytest.mark.parametrize(
    "window_size,causal,seqlen_q,seqlen_k,head_dim,dtype,heads,kv_heads", WINDOW_CASES,
    ids=[f"{w[0]}_{w[1]}-{'causal' if c else 'full'}-{sq}x{sk}-d{d}-{t}-h{h}kv{hk}"
         for w, c, sq, sk, d, t, h, hk in WINDOW_CASES])
def test_window(seed, window_size, causal, seqlen_q, seqlen_k, head_dim, dtype, heads, kv_heads):
    require_kernel(head_dim)
    q, k, v = _inputs(seed, 1, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    # Once, that the oracle without the window would fail the kernel that applies it.
    differ = {"window_size": (-1, -1)} if window_size == (100, 30) and not causal else None
    _check(seed, q, k, v, causal=causal, window_size=window_size, must_differ_from=differ)


@pytest.mark.parametrize("window_size,causal,seqlen_q,seqlen_k,head_dim,heads", [
    ((200, -1), True, 1025, 1025, 128, 2),  # backward tiles 64 × 128: each band starts past tile 0
    ((150, -1), False, 257, 700, 64, 2),    # tiles 128 × 128, a left bound alone, sq < sk
    ((300, 0), False, 700, 900, 256, 2),    # head dim 256, a right bound of 0 without causal
    # A left bound alone over more key tiles (256) than the GPU holds at once: a key tile that
    # waited for one not yet dispatched would hang.
    ((150, -1), False, 1000, 4096, 64, 8),
])
def test_window_deterministic(seed, window_size, causal, seqlen_q, seqlen_k, head_dim, heads):
    """deterministic=True adds dq in the order of each query tile's key tiles, counted from the
    band's first: two runs give the same bits (and finish) and meet the rule."""
    require_kernel(head_dim)
    q, k, v = _inputs(seed, 1, seqlen_q, seqlen_k, heads, heads, head_dim, "bf16")
    _check(seed, q, k, v, causal=causal, window_size=window_size, deterministic=True)


# --- Softcap ----------------------------------------------------------------------------------

# (softcap, causal, window_size, seqlen_q, seqlen_k, head_dim, dtype, heads, kv_heads,
# deterministic). q is scaled by 8 in every case (exact in both dtypes): scaled scores of standard
# deviation 8, which a cap of 5 bends nearly everywhere and saturates (|tanh| > 0.99) on about a
# tenth of the keys, and 30 bends only at the largest scores (mostly a test of the softmax's scale
# switching to softcap). A backward without the cap's derivative misses dq by 10 to 100 times the
# rule's bound here (checked with the XLA path standing in for the kernels).
SOFTCAP_CASES = [
    (5.0, False, (-1, -1), 97, 97, 64, "bf16", 4, 2, False),        # GQA, partial tiles
    (5.0, True, (-1, -1), 1025, 1025, 128, "fp16", 2, 2, False),
    (30.0, True, (-1, -1), 1025, 1025, 128, "bf16", 2, 2, False),
    (5.0, False, (100, 30), 1025, 1025, 64, "fp16", 2, 2, False),   # a band: inner tiles unmasked
    (30.0, True, (37, -1), 97, 1025, 256, "bf16", 8, 2, False),      # sq < sk, GQA
    (5.0, False, (-1, -1), 1, 1025, 256, "fp16", 2, 1, False),       # one query, MQA
    (30.0, False, (-1, -1), 1025, 97, 64, "fp16", 2, 2, False),      # sq > sk
    (5.0, True, (-1, -1), 1025, 97, 128, "bf16", 2, 2, False),       # rows < 928 see no key
    (5.0, True, (200, -1), 1025, 1025, 128, "bf16", 2, 2, True),
    (30.0, False, (300, -1), 1100, 1037, 128, "bf16", 2, 1, False),  # a left bound alone; SM80 kernels
]


@pytest.mark.parametrize(
    "softcap,causal,window_size,seqlen_q,seqlen_k,head_dim,dtype,heads,kv_heads,deterministic",
    SOFTCAP_CASES,
    ids=[f"cap{c:g}-{'causal' if causal else 'full'}-w{w[0]}_{w[1]}-{sq}x{sk}-d{d}-{t}-h{h}kv{hk}"
         + ("-det" if det else "") for c, causal, w, sq, sk, d, t, h, hk, det in SOFTCAP_CASES])
def test_softcap(seed, softcap, causal, window_size, seqlen_q, seqlen_k, head_dim, dtype, heads,
                 kv_heads, deterministic):
    """The cap on the scaled scores before the masks: out and lse (of the capped scores), and the
    gradients through tanh, as the oracle with the same softcap."""
    require_kernel(head_dim)
    q, k, v = _inputs(seed, 1, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    q = q * 8
    # That the oracle without the cap would fail a kernel that ignored it.
    differ = {"softcap": 0.0} if softcap == 5.0 and seqlen_q > 1 else None
    _check(seed, q, k, v, causal=causal, window_size=window_size, softcap=softcap,
           deterministic=deterministic, must_differ_from=differ)


# --- Segment ids ------------------------------------------------------------------------------

def _segment_ids(pattern):
    """(q_segment_ids [2, sq], kv_segment_ids [2, sk] or None: q's)."""
    if pattern == "packed":
        # Segments across 64- and 128-token tile edges, a single token, padding at the end.
        return _ids([(0, 1), (1, 200), (2, 100), (-1, 32)], [(5, 129), (6, 204)]), None
    if pattern == "padding_inside":
        # Padding in the middle (two negative ids, which never match each other) and first.
        return _ids([(3, 70), (-1, 50), (4, 150), (-5, 10), (7, 53)], [(-1, 64), (0, 269)]), None
    if pattern == "interleaved":
        # Non-contiguous ids: a row's keys are not one interval (element-wise id comparison).
        token = np.arange(333)
        alternating = token % 2
        alternating[150:170] = 2
        alternating[320:] = -1
        cycling = (token // 50) % 3
        cycling[[7, 100, 250]] = -1
        return jnp.asarray(np.stack([alternating, cycling]), jnp.int32), None
    if pattern == "cross":
        # seqlen_q 257 != seqlen_k 400; q's segment 3 has no keys.
        return (_ids([(0, 100), (3, 20), (1, 137)], [(2, 257)]),
                _ids([(0, 150), (1, 200), (-1, 50)], [(-1, 100), (2, 300)]))
    if pattern == "split":
        # kv's segment 0 in two runs around segment 1: the queries of segment 0 get its whole
        # extent cut by the band, marked inexact, and with a short window many of them see no
        # key at all although their interval is not empty.
        return (_ids([(0, 230)], [(0, 100), (-1, 130)]),
                _ids([(0, 10), (1, 200), (0, 20)], [(0, 30), (1, 150), (0, 50)]))
    raise ValueError(pattern)


# (pattern, causal, window_size, head_dim, dtype, deterministic, softcap); cases with the same
# shapes and options share their compilations. With softcap, q is scaled by 8 (see
# SOFTCAP_CASES).
SEGMENT_CASES = [
    ("packed", False, (-1, -1), 64, "bf16", False, 0.0),
    ("interleaved", False, (-1, -1), 64, "bf16", False, 0.0),
    ("packed", True, (-1, -1), 128, "fp16", False, 0.0),
    ("padding_inside", True, (-1, -1), 128, "fp16", False, 0.0),
    ("packed", True, (50, -1), 64, "bf16", True, 0.0),
    ("interleaved", True, (50, -1), 64, "bf16", False, 0.0),
    ("cross", True, (-1, -1), 64, "fp16", False, 0.0),
    ("cross", False, (50, 10), 128, "bf16", False, 0.0),
    ("split", True, (20, -1), 64, "bf16", False, 0.0),
    ("packed", True, (-1, -1), 128, "fp16", False, 5.0),
    ("interleaved", False, (50, -1), 64, "bf16", False, 30.0),
]


@pytest.mark.parametrize(
    "pattern,causal,window_size,head_dim,dtype,deterministic,softcap", SEGMENT_CASES,
    ids=[f"{p}-{'causal' if c else 'full'}-w{w[0]}_{w[1]}-d{d}-{t}" + ("-det" if det else "")
         + (f"-cap{cap:g}" if cap else "") for p, c, w, d, t, det, cap in SEGMENT_CASES])
def test_segment_ids(seed, pattern, causal, window_size, head_dim, dtype, deterministic, softcap):
    """Two rows of ids with GQA; padded queries give out 0, lse -inf and dq 0, padded keys dk
    and dv 0 (checked by the rule's exact zeros)."""
    require_kernel(head_dim)
    q_ids, kv_ids = _segment_ids(pattern)
    seqlen_q = q_ids.shape[1]
    seqlen_k = seqlen_q if kv_ids is None else kv_ids.shape[1]
    q, k, v = _inputs(seed, 2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    if softcap:
        q = q * 8
    differ = ({"q_ids": None, "kv_ids": None} if pattern == "packed" and not causal else None)
    out, lse, dq, _, _ = _check(seed, q, k, v, q_ids, kv_ids, causal=causal,
                                window_size=window_size, softcap=softcap,
                                deterministic=deterministic, must_differ_from=differ)
    padding = np.asarray(q_ids) < 0
    assert padding.any() or pattern in ("cross", "split")
    assert np.isneginf(np.asarray(lse).transpose(0, 2, 1)[padding]).all()
    assert not np.asarray(out, np.float32)[padding].any()
    assert not np.asarray(dq, np.float32)[padding].any()


# --- flash_attention_varlen -------------------------------------------------------------------

# Sequences of (queries, keys): (1, 1), (0, 49), (200, 283), (260, 127) with more queries than
# keys, (300, 300) and (39, 0) whose queries see nothing.
CU_SEQLENS_Q = np.array([0, 1, 1, 201, 461, 761, 800])
CU_SEQLENS_K = np.array([0, 1, 50, 333, 460, 760, 760])
MAX_SEQLEN = 300


def _flash_varlen(q, k, v, cu_q, cu_k, *, causal, window_size, softcap):
    """(out, lse) of the kernels."""
    return jax_flash.flash_attention_varlen(
        q, k, v, cu_q, cu_k, MAX_SEQLEN, MAX_SEQLEN, causal=causal, window_size=window_size,
        softcap=softcap, return_lse=True, implementation="cuda")


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap"))
def _flash_varlen_grads(q, k, v, dout, dlse, cu_q, cu_k, *, causal, window_size, softcap):
    """(dq, dk, dv) of the kernels (their forward inside), for cotangents dout and dlse."""
    attention = functools.partial(_flash_varlen, cu_q=cu_q, cu_k=cu_k, causal=causal,
                                  window_size=window_size, softcap=softcap)
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp((dout, dlse))


def _varlen_empty_rows(causal, window_size):
    """bool [total_q]: the queries that see no key of their sequence (each aligned at its own
    bottom right: query a of (lq, lk) sees key c iff c - (a + lk - lq) is within the band)."""
    right = window_size[1]
    if causal:
        right = 0 if right == -1 else min(right, 0)
    empty = []
    for a, b, c, d in zip(CU_SEQLENS_Q[:-1], CU_SEQLENS_Q[1:], CU_SEQLENS_K[:-1],
                          CU_SEQLENS_K[1:]):
        diagonal = np.arange(b - a) + (d - c) - (b - a)
        empty.append((d == c) | ((right != -1) & (diagonal + right < 0)))
    return np.concatenate(empty)


def _varlen_oracle(q, k, v, dout, dlse, *, causal, window_size, softcap, compute_dtype):
    """(out [tq, h, d], lse [h, tq], dq, dk, dv [tk, hk, d]) of dense attention on each sequence
    alone, in compute_dtype; zeros (lse -inf) where a sequence has no keys or no queries.

    One call for all: a batch of the sequences, each padded at the front to the longest (which
    keeps the bottom-right alignment), a mask hiding the padded keys (as per_sequence_oracle in
    test_segments_cpu, without its many small eager ops)."""
    sequences = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(
        CU_SEQLENS_Q[:-1], CU_SEQLENS_Q[1:], CU_SEQLENS_K[:-1], CU_SEQLENS_K[1:])
        if b > a and d > c]
    longest_q = max(rows.stop - rows.start for rows, _ in sequences)
    longest_k = max(keys.stop - keys.start for _, keys in sequences)

    def front_padded(x, axis, length, which):
        x = np.asarray(x)  # its own dtype; padding and slicing in numpy
        pieces = [np.moveaxis(np.moveaxis(x, axis, 0)[index[which]], 0, axis)
                  for index in sequences]
        return np.stack([np.pad(p, [(length - p.shape[i], 0) if i == axis else (0, 0)
                                    for i in range(p.ndim)]) for p in pieces])

    padded = (front_padded(q, 0, longest_q, 0), front_padded(k, 0, longest_k, 1),
              front_padded(v, 0, longest_k, 1), front_padded(dout, 0, longest_q, 0),
              front_padded(dlse, 1, longest_q, 0))
    key_valid = np.stack([np.arange(longest_k) >= longest_k - (keys.stop - keys.start)
                          for _, keys in sequences])[:, None, None, :]
    results = _reference(*jax.device_put((*padded, None, None, key_valid), _cpu()),
                         causal=causal, window_size=window_size, softcap=softcap,
                         compute_dtype=compute_dtype)
    full = [np.zeros(q.shape, np.float32), np.full((q.shape[1], q.shape[0]), -np.inf, np.float32),
            np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32),
            np.zeros(k.shape, np.float32)]
    for i, (rows, keys) in enumerate(sequences):
        lq, lk = rows.stop - rows.start, keys.stop - keys.start
        full[0][rows], full[2][rows] = (np.asarray(x[i, -lq:], np.float32)
                                        for x in (results[0], results[2]))
        full[1][:, rows] = np.asarray(results[1][i, :, -lq:])
        full[3][keys], full[4][keys] = (np.asarray(x[i, -lk:], np.float32)
                                        for x in (results[3], results[4]))
    return full


@pytest.mark.parametrize("causal,window_size,head_dim,dtype,softcap", [
    (True, (-1, -1), 128, "bf16", 0.0),
    (False, (30, 5), 64, "fp16", 0.0),  # rows 0-127 of the (260, 127) sequence see nothing
    (True, (-1, -1), 64, "fp16", 5.0),  # q scaled by 8, see SOFTCAP_CASES
])
def test_varlen(seed, causal, window_size, head_dim, dtype, softcap):
    """Each sequence aligned at its own bottom right, against dense attention on each sequence
    alone; empty sequences of queries and of keys, GQA."""
    require_kernel(head_dim)
    total_q, total_k, heads, kv_heads = CU_SEQLENS_Q[-1], CU_SEQLENS_K[-1], 4, 2
    q, k, v = (x[0] for x in _inputs(seed, 1, total_q, total_k, heads, kv_heads, head_dim,
                                     dtype))
    if softcap:
        q = q * 8
    dout = random_normal(seed + 1, q.shape, q.dtype)
    empty_rows = _varlen_empty_rows(causal, window_size)
    dlse = random_normal(seed + 2, (heads, total_q), jnp.float32) * ~empty_rows
    options = dict(causal=causal, window_size=window_size, softcap=softcap)

    oracle = _varlen_oracle(q, k, v, dout, dlse, **options, compute_dtype=jnp.float32)
    dense = _varlen_oracle(q, k, v, dout, dlse, **options, compute_dtype=q.dtype)
    np.testing.assert_array_equal(np.isneginf(oracle[1]).all(0), empty_rows)
    flash = _run_flash(_bound(_flash_varlen, **options), _bound(_flash_varlen_grads, **options),
                       q, k, v, dout, dlse, jnp.asarray(CU_SEQLENS_Q), jnp.asarray(CU_SEQLENS_K))
    assert flash[0].dtype == q.dtype and flash[1].dtype == jnp.float32
    _assert_within_rule(*([x[None] for x in results] for results in (flash, oracle, dense)),
                        q.dtype)
