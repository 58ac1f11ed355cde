"""Forward numerics of the CUDA kernel (implementation="cuda") against the float32 oracle; GPU only.

The bar is FlashAttention's: the kernel's largest error against the float32 oracle is at most twice
the largest error of plain dense attention computed in the same low precision, plus EPSILON. lse is
compared with the oracle's directly (both float32), -inf rows included.

Every kernel call runs on poisoned memory (see `run_on_poisoned_memory`), so an output element the
kernel never writes reads NaN and fails the test instead of passing with stale data.
"""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash._reference import attention_reference

pytestmark = pytest.mark.gpu

DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
# Every head dim that can have a kernel (160 and 224 only in builds that ask for them, padded to
# 192 and 256 otherwise), and sizes the library pads up to the next one.
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
PADDED_HEAD_DIMS = (40, 80, 200)

EPSILON = 1e-3
LSE_RTOL = 1e-4
LSE_ATOL = 1e-3


# --- Inputs -----------------------------------------------------------------------------------

@pytest.fixture
def seed(request) -> int:
    """A seed of this test's own, stable across runs: its id hashed."""
    return zlib.crc32(request.node.nodeid.encode())


def random_qkv(seed, batch, seqlen_q, seqlen_k, num_heads, head_dim, dtype):
    """Standard-normal q, k, v (never zeros: they hide unwritten outputs and wrong indexing)."""
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(key_q, (batch, seqlen_q, num_heads, head_dim), dtype)
    k = jax.random.normal(key_k, (batch, seqlen_k, num_heads, head_dim), dtype)
    v = jax.random.normal(key_v, (batch, seqlen_k, num_heads, head_dim), dtype)
    return q, k, v


def require_kernel(head_dim: int) -> None:
    """Fails without kernels (this file runs on a GPU); skips a head dim a restricted build left out
    (JAX_FLASH_HEAD_DIMS)."""
    info = jax_flash.kernel_info()
    if not info["kernels_built"]:
        pytest.fail(f"jax-flash has no CUDA kernels: {info['reason']}")
    if not any(built >= head_dim for built in info["head_dims"]):
        pytest.skip(f"no kernel built for head_dim {head_dim} (built: {info['head_dims']})")


# --- Poisoned output memory -------------------------------------------------------------------
#
# XLA allocates a computation's output and temp buffers from its device allocator (a best-fit pool)
# when the computation starts. Just before the kernel's computation runs, we allocate buffers of
# exactly those sizes, fill every byte with 0xFF (NaN as float32, float16 and bfloat16 alike) and
# free them: the pool is then as it was, and the same sizes asked for next get the same, now
# NaN-filled, blocks. Nothing else allocates in between (the kernel's function is compiled and its
# inputs made before). The outputs' addresses are then checked to lie inside the poisoned blocks,
# so the test knows the poisoning reached them rather than hoping it did. (The temp buffer, where
# the kernel writes a padded head_dim's output before it is sliced, is poisoned the same way but
# has no address to check.)

@functools.partial(jax.jit, static_argnums=0)
def _filled_bytes(nbytes: int, byte) -> jax.Array:
    # `byte` is traced so that XLA writes the buffer in a kernel rather than folding a constant.
    return jnp.full((nbytes,), byte, jnp.uint8)


@functools.cache
def _poison_byte() -> jax.Array:
    # Made once and kept: a fresh argument would take (and then free) a small block of the pool
    # right beside the poisoned ones, shifting where the next allocations land.
    return jnp.uint8(0xFF)


# Spare small poisoned blocks: XLA may take a small block of its own before the outputs (seen on an
# H200: one, ahead of an 8-byte lse, which then missed the one poisoned block of its size).
_SPARE_SMALL_BLOCKS = 4
# The pool's smallest block; blocks come in multiples of it, so a result may sit in the rounded-up
# tail of a freed block, which is poisoned too.
_SMALL_BLOCK_BYTES = 256


def _poison_sizes(compiled, out_shapes) -> list[int]:
    sizes = [math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(out_shapes)]
    stats = compiled.memory_analysis()
    temp_bytes = getattr(stats, "temp_size_in_bytes", 0) if stats is not None else 0
    spares = [_SMALL_BLOCK_BYTES] * _SPARE_SMALL_BLOCKS
    sizes = sizes + ([temp_bytes] if temp_bytes else []) + spares
    return [-(-n // _SMALL_BLOCK_BYTES) * _SMALL_BLOCK_BYTES for n in sizes]


def _covered(start: int, nbytes: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether [start, start + nbytes) lies inside the union of the (start, end) `ranges`."""
    merged = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return any(lo <= start and start + nbytes <= hi for lo, hi in merged)


# Placement attempts. With several test processes on one GPU (pytest-xdist) a result sometimes
# takes a free block other than the poisoned ones (seen about once per 300 tests on an H200), and
# the allocator, being deterministic, would hand it the same block again: so a result that missed
# is kept alive until the end, holding that block, and the next attempt poisons afresh.
_POISON_ATTEMPTS = 6


def run_on_poisoned_memory(fn, *args):
    """fn(*args), jitted, run on output memory that held NaN just before; asserts it did."""
    compiled = jax.jit(fn).lower(*args).compile()
    sizes = _poison_sizes(compiled, jax.eval_shape(fn, *args))
    held = []
    try:
        for _ in range(_POISON_ATTEMPTS):
            poison = [_filled_bytes(nbytes, _poison_byte()) for nbytes in sizes]
            jax.block_until_ready(poison)
            ranges = [(p.unsafe_buffer_pointer(), p.unsafe_buffer_pointer() + p.nbytes) for p in poison]
            for p in poison:
                p.delete()
            outputs = jax.block_until_ready(compiled(*args))
            leaves = jax.tree.leaves(outputs)
            missed = [not _covered(out.unsafe_buffer_pointer(), out.nbytes, ranges) for out in leaves]
            if not any(missed):
                return outputs
            for out, miss in zip(leaves, missed):
                if miss:
                    held.append(out)
                else:
                    out.delete()
    finally:
        for out in held:
            out.delete()
    raise AssertionError(
        "the output buffer did not land in the freed NaN-filled memory, so unwritten elements "
        "would go unnoticed (a different XLA_PYTHON_CLIENT_ALLOCATOR?)")


# --- Oracle and the low-precision baseline ----------------------------------------------------
#
# Both run on the host CPU: apart from the device under test, and without the per-shape autotuning
# that XLA's GPU compiler spends seconds on for every new matmul shape.

def on_cpu(*arrays):
    return jax.device_put(arrays, jax.devices("cpu")[0])


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale"))
def oracle(q, k, v, *, causal, softmax_scale):
    return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale"))
def dense_attention_in_dtype(q, k, v, *, causal, softmax_scale):
    """Plain XLA attention in the inputs' dtype, as jax.nn.dot_product_attention(implementation=
    "xla") computes it on a GPU: float32 scores and softmax, probabilities rounded to the dtype, p·v
    accumulated in float32 and rounded. Products of half-precision numbers are exact in float32, so
    upcasting first gives what a float32-accumulating matmul unit gives. Its own mask, since jax.nn
    aligns causal top-left."""
    dtype = q.dtype
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=highest) * softmax_scale
    visible = jnp.ones((seqlen_q, seqlen_k), bool)
    if causal:
        query, key = jnp.arange(seqlen_q)[:, None], jnp.arange(seqlen_k)[None, :]
        visible = key <= query + seqlen_k - seqlen_q
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    # A query that sees no key gets 0 (softmax of an all -inf row is NaN).
    probs = jnp.where(visible, probs, 0).astype(dtype).astype(jnp.float32)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=highest)
    return out.astype(dtype)


def assert_matches_oracle(q, k, v, out, lse, *, causal, softmax_scale):
    """The FlashAttention rule for out, a tight tolerance for lse; q, k, v, out are 4-D."""
    q, k, v = on_cpu(q, k, v)
    out_ref, lse_ref = oracle(q, k, v, causal=causal, softmax_scale=softmax_scale)
    out_low = dense_attention_in_dtype(q, k, v, causal=causal, softmax_scale=softmax_scale)
    out, lse, out_ref, lse_ref, out_low = (np.asarray(x, np.float32)
                                           for x in (out, lse, out_ref, lse_ref, out_low))
    assert out.shape == out_ref.shape and lse.shape == lse_ref.shape
    assert not np.isnan(out).any(), f"{np.isnan(out).sum()} NaN in out (unwritten elements?)"
    assert not np.isnan(lse).any(), f"{np.isnan(lse).sum()} NaN in lse (unwritten elements?)"

    kernel_error = np.abs(out - out_ref).max()
    baseline_error = np.abs(out_low - out_ref).max()
    assert kernel_error <= 2 * baseline_error + EPSILON, (
        f"max |out - oracle| = {kernel_error:.3e} > 2 × {baseline_error:.3e} (dense XLA attention "
        f"in {q.dtype}) + {EPSILON}")

    empty_rows = np.isneginf(lse_ref)  # [b, h, sq]: queries that see no key
    np.testing.assert_array_equal(np.isneginf(lse), empty_rows, "lse -inf rows differ")
    np.testing.assert_allclose(lse[~empty_rows], lse_ref[~empty_rows], rtol=LSE_RTOL,
                               atol=LSE_ATOL, err_msg="lse")
    assert not out.transpose(0, 2, 1, 3)[empty_rows].any(), "rows that see no key must be 0"


def check_kernel(q, k, v, *, causal, softmax_scale=None):
    """Runs the kernel on poisoned memory and holds it to the oracle."""
    flash = functools.partial(jax_flash.flash_attention, causal=causal,
                              softmax_scale=softmax_scale, return_lse=True, implementation="cuda")
    out, lse = run_on_poisoned_memory(flash, q, k, v)
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    if softmax_scale is None:  # the default follows the unpadded head_dim
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    assert_matches_oracle(q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)


# --- Numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(128, 128), (113, 257)])
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS + PADDED_HEAD_DIMS)
def test_head_dims(seed, head_dim, seqlen_q, seqlen_k, dtype, causal):
    """Every head dim (padded ones too) × dtype × causal, one tile-aligned and one ragged shape."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 2, seqlen_q, seqlen_k, 3, head_dim, DTYPES[dtype])
    check_kernel(q, k, v, causal=causal)


SEQLENS = [
    (1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025),  # square, around tile edges
    (257, 113), (1, 1025), (1025, 1), (97, 1025),           # seqlen_q != seqlen_k both ways
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_seqlens(seed, seqlen_q, seqlen_k, head_dim, dtype, causal):
    """Lengths of 1, partial tiles, one past a tile, and rows that see no key (causal, sq > sk)."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 2, seqlen_q, seqlen_k, 3, head_dim, DTYPES[dtype])
    check_kernel(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim,dtype", [(64, "bf16"), (128, "bf16"), (256, "bf16"),
                                            (128, "fp16")])
def test_long_seqlen(seed, head_dim, dtype, causal):
    """4097: many key tiles and a one-row last query tile; few heads to keep the oracle cheap."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 1, 4097, 4097, 2, head_dim, DTYPES[dtype])
    check_kernel(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("pattern", ["q_times_10", "keys_growing"])
def test_large_scores(seed, pattern, head_dim, dtype, causal):
    """Scores far from 0 exercise the online softmax's rescaling. q·10 gives large scores
    anywhere; keys growing along seqlen move each row's running max up with every key tile."""
    require_kernel(head_dim)
    q, k, v = random_qkv(seed, 2, 1025, 1025, 2, head_dim, DTYPES[dtype])
    if pattern == "q_times_10":
        q = q * 10
    else:
        growth = jnp.linspace(0.1, 4.0, k.shape[1], dtype=jnp.float32)[None, :, None, None]
        q, k = q * 2, (k * growth).astype(k.dtype)
    check_kernel(q, k, v, causal=causal)


def test_batch_beyond_grid_limit(seed):
    """A batch over CUDA's grid limit (65535), as vmap can make by folding its axis into the
    batch, runs as several launches; the rows after the first launch must be written too."""
    require_kernel(32)
    q, k, v = random_qkv(seed, 65535 + 7, 5, 6, 1, 32, jnp.bfloat16)
    check_kernel(q, k, v, causal=True)


@pytest.mark.parametrize("softmax_scale", [0.05, 1.0])
def test_softmax_scale(seed, softmax_scale):
    require_kernel(80)
    q, k, v = random_qkv(seed, 2, 257, 300, 2, 80, jnp.bfloat16)
    check_kernel(q, k, v, causal=True, softmax_scale=softmax_scale)


# --- Transformations and lowering -------------------------------------------------------------

@pytest.mark.parametrize("batched_kv", [True, False], ids=["vmap_qkv", "vmap_q_only"])
def test_jit_vmap(seed, batched_kv):
    """vmap over a leading axis inside jit matches the oracle on every slice."""
    require_kernel(64)
    stack, batch, seqlen_q, seqlen_k, heads, head_dim = 3, 2, 97, 130, 2, 64
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (stack, batch, seqlen_q, heads, head_dim), jnp.bfloat16)
    kv_shape = ((stack,) if batched_kv else ()) + (batch, seqlen_k, heads, head_dim)
    k = jax.random.normal(keys[1], kv_shape, jnp.bfloat16)
    v = jax.random.normal(keys[2], kv_shape, jnp.bfloat16)

    flash = functools.partial(jax_flash.flash_attention, causal=True, return_lse=True,
                              implementation="cuda")
    kv_axis = 0 if batched_kv else None
    out, lse = run_on_poisoned_memory(jax.vmap(flash, in_axes=(0, kv_axis, kv_axis)), q, k, v)

    # The oracle sees the stacked axis folded into batch.
    k, v = (jnp.broadcast_to(x, (stack,) + kv_shape[-4:]) for x in (k, v))
    q, k, v, out, lse = (x.reshape((stack * batch,) + x.shape[2:]) for x in (q, k, v, out, lse))
    assert_matches_oracle(q, k, v, out, lse, causal=True, softmax_scale=1.0 / math.sqrt(head_dim))


@pytest.mark.parametrize("implementation", ["cuda", None], ids=["cuda", "auto"])
def test_kernel_custom_call_is_used(implementation):
    """implementation="cuda", and auto for bf16 on a GPU, lower to our custom call, and it
    survives XLA's compilation."""
    require_kernel(128)
    q = k = v = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    flash = functools.partial(jax_flash.flash_attention, causal=True,
                              implementation=implementation)
    lowered = jax.jit(flash).lower(q, k, v)
    assert "jax_flash_fwd" in lowered.as_text()
    assert "jax_flash_fwd" in lowered.compile().as_text()
