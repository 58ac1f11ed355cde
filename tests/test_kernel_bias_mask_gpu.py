"""mask and bias in the CUDA kernels (implementation="cuda"): out and lse, and the gradients
dq, dk, dv and dbias of the backward kernel (the XLA backward, from the kernel's out and lse,
where deterministic=True meets a bias that broadcasts), against the float32 oracle with the
same mask and bias, held to
test_kernel_masks_gpu's rule (twice the error of the same dense computation in the inputs' dtype,
plus the oracle's rounding to the result's dtype, SLACK and TINY; out within twice plus EPSILON,
lse as tight as test_fwd_gpu's, -inf rows included); GPU only.

The forward runs on poisoned memory. mask and bias are 4-D
and broadcast to [batch, heads, seqlen_q, seqlen_k] from the shapes their names spell ("1hqk":
[1, heads, seqlen_q, seqlen_k], "b11k": [batch, 1, 1, seqlen_k], ...). Biases are normal·3, so
they move every row's softmax; masks are random (half the keys), padding-style, or hide whole
128×128 tiles (which the kernels skip) and a band of rows that then see no key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import random_normal
from test_fwd_gpu import require_kernel, run_on_poisoned_memory
from test_fwd_gpu import seed  # noqa: F401  a fixture
from test_kernel_alibi_gpu import _geometric_slopes, _max_error, assert_within_rule
from test_kernel_masks_gpu import _bound, _inputs, _segment_ids

pytestmark = pytest.mark.gpu

NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")
BIAS_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
TILE = 128


def _shape(dims: str, batch, heads, seqlen_q, seqlen_k):
    """dims like "b11k": b, h, q, k take the full size, 1 broadcasts."""
    sizes = {"b": batch, "h": heads, "q": seqlen_q, "k": seqlen_k, "1": 1}
    return tuple(sizes[d] for d in dims)


def _mask(seed, spec, *sizes):
    """spec "<dims>_<pattern>": random (each key kept with probability 1/2), padding (a prefix
    of keys per batch row) or blocks (whole 128×128 tiles hidden, shown or half shown, and a band
    of rows that see no key)."""
    dims, pattern = spec.split("_")
    shape = _shape(dims, *sizes)
    rng = np.random.default_rng(seed + 5)
    if pattern == "random":
        return jnp.asarray(rng.random(shape) < 0.5)
    if pattern == "padding":
        assert dims == "b11k"
        lengths = rng.integers(shape[-1] // 4, shape[-1], shape[0]) + 1
        return jnp.asarray(np.arange(shape[-1]) < lengths[:, None, None, None])
    assert pattern == "blocks" and dims.endswith("qk")
    *lead, seqlen_q, seqlen_k = shape
    # Per tile, 0: hidden (skipped), 1: all shown, 2: half the keys shown.
    state = rng.integers(0, 3, (*lead, -(-seqlen_q // TILE), -(-seqlen_k // TILE)))
    state = state.repeat(TILE, -2).repeat(TILE, -1)[..., :seqlen_q, :seqlen_k]
    mask = (state == 1) | ((state == 2) & (rng.random(shape) < 0.5))
    mask[..., seqlen_q // 3:seqlen_q // 3 + 50, :] = False  # across a tile edge at 1025
    return jnp.asarray(mask)


def _bias(seed, spec, *sizes):
    """spec "<dims>_<dtype>": normal·3 in that dtype."""
    dims, dtype = spec.split("_")
    return (random_normal(seed + 6, _shape(dims, *sizes), jnp.float32) * 3).astype(
        BIAS_DTYPES[dtype])


# --- The kernels and the oracle ---------------------------------------------------------------

def _attention(attention, q, k, v, mask, bias, slopes, q_ids, **options):
    return attention(q, k, v, mask=mask, bias=bias, alibi_slopes=slopes, q_segment_ids=q_ids,
                     kv_segment_ids=q_ids, **options)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "deterministic",
                                             "implementation"))
def _flash(q, k, v, mask, bias, slopes, q_ids, implementation="cuda", **options):
    return _attention(jax_flash.flash_attention, q, k, v, mask, bias, slopes, q_ids,
                      return_lse=True, implementation=implementation, **options)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "deterministic",
                                             "bias_grad", "implementation"))
def _flash_grads(q, k, v, mask, bias, slopes, q_ids, dout, dlse, *, bias_grad, implementation,
                 **options):
    """(dq, dk, dv), and dbias when bias_grad, for cotangents dout and dlse: the forward kernel,
    then the backward of `implementation`."""
    def attention(q, k, v, bias):
        return _flash(q, k, v, mask, bias, slopes, q_ids, implementation=implementation,
                      **options)

    if bias_grad:
        return jax.vjp(attention, q, k, v, bias)[1]((dout, dlse))
    return jax.vjp(functools.partial(attention, bias=bias), q, k, v)[1]((dout, dlse))


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "softcap", "compute_dtype"))
def _reference(q, k, v, mask, bias, slopes, q_ids, dout, dlse, *, compute_dtype, **options):
    """(out, lse, dq, dk, dv, dbias, dlse) of dense attention_reference in compute_dtype (dbias
    None without a bias); dlse gets 0 on rows that see no key (lse's derivative is NaN there).
    The bias goes in as float32 (attention_reference rounds it to compute_dtype), so that the
    oracle's dbias is not rounded to the bias's dtype."""
    def attention(q, k, v, bias):
        return _attention(jax_flash.attention_reference, q, k, v, mask, bias, slopes, q_ids,
                          compute_dtype=compute_dtype, **options)

    bias = None if bias is None else bias.astype(jnp.float32)
    (out, lse), vjp = jax.vjp(attention, *(x.astype(compute_dtype) for x in (q, k, v)), bias)
    dlse = jnp.where(jnp.isneginf(lse), 0, dlse)
    return (out, lse, *vjp((dout.astype(compute_dtype), dlse)), dlse)


def _check(seed, q, k, v, mask=None, bias=None, slopes=None, q_ids=None, *, bias_grad=True,
           deterministic=False, must_differ=False, **options):
    """Runs the forward kernel on poisoned memory, then the gradients (dbias too when
    bias_grad), and holds them to the oracle given the same operands and options.

    must_differ: also check that the oracle without the mask, and without the bias, misses the
    kernels' out by far (that the test would catch a kernel ignoring either)."""
    batch, seqlen_q, heads, _ = q.shape
    bias_grad = bias_grad and bias is not None
    names = NAMES if bias_grad else NAMES[:5]
    dout = random_normal(seed + 1, q.shape, q.dtype)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32)
    operands = (mask, bias, slopes, q_ids)
    on_cpu = jax.device_put((q, k, v, *operands, dout, dlse), jax.devices("cpu")[0])
    *oracle, dlse = _reference(*on_cpu, compute_dtype=jnp.float32, **options)
    *dense, _ = _reference(*on_cpu, compute_dtype=q.dtype, **options)
    dlse = jax.device_put(dlse, q.devices().pop())  # the oracle's: 0 on rows that see no key
    forward = _bound(_flash, **options, deterministic=deterministic)
    # The kernel adds the gradient of a bias that broadcasts atomically: not deterministic.
    broadcasts = bias is not None and any(
        size == 1 < whole for size, whole in zip(bias.shape, (batch, heads, seqlen_q, k.shape[1])))
    backward = _bound(_flash_grads, **options, deterministic=deterministic, bias_grad=bias_grad,
                      implementation=None if deterministic and broadcasts else "cuda")

    def run():
        out, lse = run_on_poisoned_memory(forward, q, k, v, *operands)
        grads = jax.jit(backward)(q, k, v, *operands, dout, dlse)
        if bias_grad:  # typed and shaped like the bias, broadcast dims summed
            assert grads[3].dtype == bias.dtype and grads[3].shape == bias.shape
        return [np.asarray(x, np.float32) for x in (out, lse, *grads)]

    flash = run()
    oracle, dense = ([np.asarray(x, np.float32) for x in r[:len(names)]] for r in (oracle, dense))
    # dbias is rounded to the bias's dtype, the rest to q's.
    dtypes = [bias.dtype if name == "dbias" else q.dtype for name in names[2:]]
    out_bound = assert_within_rule(names, flash, oracle, dense, dtypes)
    finite = ~np.isneginf(oracle[1])
    # Rows that see no key: exactly 0, whatever the bias there.
    for name, x in (("out", flash[0]), ("dq", flash[2])):
        assert not x.transpose(0, 2, 1, 3)[~finite].any(), f"{name} of rows that see no key"

    if must_differ:
        for name, index in (("mask", 3), ("bias", 4)):
            without = list(on_cpu)
            without[index] = None
            other = _reference(*without, compute_dtype=jnp.float32, **options)[0]
            assert _max_error(flash[0], np.asarray(other)) > 10 * out_bound, (
                f"the oracle without the {name} is as close: the test cannot see it")

    if deterministic:
        for name, a, b in zip(names, flash, run()):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between two runs")


# --- Cases ------------------------------------------------------------------------------------

# (mask, bias, causal, window_size, softcap, seqlen_q, seqlen_k, head_dim, dtype, heads, kv_heads,
# deterministic); batch 2. With softcap, q is scaled by 8 (as in test_kernel_masks_gpu's
# SOFTCAP_CASES) so that the cap bends the scores.
CASES = [
    ("bhqk_random", None, False, (-1, -1), 0.0, 1025, 1025, 128, "bf16", 2, 2, False),
    (None, "bhqk_f32", False, (-1, -1), 0.0, 1025, 1025, 128, "fp16", 2, 2, False),
    ("bhqk_blocks", "bhqk_bf16", False, (-1, -1), 0.0, 1025, 1025, 64, "bf16", 2, 2, False),
    ("1hqk_random", "1hqk_bf16", False, (-1, -1), 0.0, 97, 1025, 64, "fp16", 8, 2, False),  # GQA
    ("b11k_padding", "b11k_f32", True, (-1, -1), 0.0, 1025, 1025, 128, "bf16", 4, 1, False),
    ("11qk_blocks", "11qk_f32", False, (200, 0), 0.0, 1025, 1025, 256, "bf16", 2, 2, True),
    # Whole rows hidden; a per-row bias moves only lse (and dbias is dlse).
    ("bhq1_random", "bhq1_f32", False, (-1, -1), 0.0, 1025, 97, 64, "fp16", 2, 2, False),
    ("11qk_random", "1hqk_fp16", False, (-1, -1), 0.0, 97, 97, 96, "fp16", 4, 2, False),  # padded dim
    # softcap with a mask (the kernels take no bias with softcap)
    ("bhqk_random", None, True, (-1, -1), 5.0, 1025, 1025, 128, "bf16", 2, 2, False),
    ("bhqk_random", "b11k_bf16", False, (-1, -1), 0.0, 1, 1025, 64, "bf16", 2, 1, False),
    ("11qk_random", "bhqk_f32", True, (-1, -1), 0.0, 17, 17, 256, "fp16", 2, 2, False),
    ("bhqk_blocks", "1hqk_f32", True, (-1, -1), 0.0, 1025, 97, 128, "bf16", 2, 2, False),
    ("bhqk_random", None, False, (-1, -1), 30.0, 1025, 1, 64, "bf16", 2, 2, False),
    ("1hqk_blocks", "bhqk_bf16", True, (-1, -1), 0.0, 1025, 1025, 128, "bf16", 4, 2, True),
    # deterministic: the backward kernel visits the tiles the mask hides too
    ("bhqk_blocks", None, False, (-1, -1), 0.0, 1025, 1025, 64, "fp16", 2, 1, True),
]


@pytest.mark.parametrize(
    "mask,bias,causal,window_size,softcap,seqlen_q,seqlen_k,head_dim,dtype,heads,kv_heads,"
    "deterministic", CASES,
    ids=[f"{m or 'nomask'}-{b or 'nobias'}-{'causal' if c else 'full'}-w{w[0]}_{w[1]}-cap{cap:g}"
         f"-{sq}x{sk}-d{d}-{t}-h{h}kv{hk}" + ("-det" if det else "")
         for m, b, c, w, cap, sq, sk, d, t, h, hk, det in CASES])
def test_mask_bias(seed, mask, bias, causal, window_size, softcap, seqlen_q, seqlen_k, head_dim,
                   dtype, heads, kv_heads, deterministic):
    require_kernel(head_dim)
    sizes = (2, heads, seqlen_q, seqlen_k)
    q, k, v = _inputs(seed, 2, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    if softcap:
        q = q * 8
    mask = None if mask is None else _mask(seed, mask, *sizes)
    bias = None if bias is None else _bias(seed, bias, *sizes)
    _check(seed, q, k, v, mask, bias, causal=causal, window_size=window_size, softcap=softcap,
           deterministic=deterministic)


@pytest.mark.parametrize("extra", ["alibi", "segment_ids"])
def test_with_alibi_or_segment_ids(seed, extra):
    """Scores − ALiBi + bias, then the mask; or the mask and segment ids hiding keys together."""
    require_kernel(128)
    q_ids = _segment_ids("packed")[0] if extra == "segment_ids" else None
    seqlen = 1025 if q_ids is None else q_ids.shape[1]
    sizes = (2, 4, seqlen, seqlen)
    q, k, v = _inputs(seed, 2, seqlen, seqlen, 4, 2, 128, "bf16")
    slopes = _geometric_slopes(4) if extra == "alibi" else None
    _check(seed, q, k, v, _mask(seed, "1hqk_random", *sizes), _bias(seed, "bhqk_bf16", *sizes),
           slopes, q_ids, causal=True, window_size=(-1, -1), softcap=0.0)


@pytest.mark.parametrize("bias", ["bhqk_f32", "b11k_bf16"])
def test_bias_not_differentiated(seed, bias):
    """Gradients with respect to q, k and v alone: the bias still shapes them."""
    require_kernel(128)
    sizes = (2, 2, 1025, 1025)
    q, k, v = _inputs(seed, 2, 1025, 1025, 2, 2, 128, "bf16")
    _check(seed, q, k, v, _mask(seed, "bhqk_blocks", *sizes), _bias(seed, bias, *sizes),
           bias_grad=False, causal=True, window_size=(-1, -1), softcap=0.0)


def test_oracle_without_mask_or_bias_fails(seed):
    """The rule can fail: the oracle without the mask, or without the bias, misses by far."""
    require_kernel(64)
    sizes = (2, 2, 1025, 1025)
    q, k, v = _inputs(seed, 2, 1025, 1025, 2, 2, 64, "bf16")
    _check(seed, q, k, v, _mask(seed, "bhqk_random", *sizes), _bias(seed, "bhqk_f32", *sizes),
           causal=False, window_size=(-1, -1), softcap=0.0, must_differ=True)
