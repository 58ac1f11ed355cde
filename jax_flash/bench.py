"""Attention benchmark: jax-flash against cuDNN and plain XLA, forward and forward + backward,
timed in the same run.

    python -m jax_flash.bench [--out bench_results.json] [--passes fwd,fwd_bwd]
        [--head-dims 64,128,256] [--seqlens ...] [--impls flash,cudnn,xla]
        [--causal both|true|false] [--dtype bf16] [--kv-group G] [--window W] [--segments N]
        [--softcap C] [--alibi] [--dropout P] [--key-padding F] [--bias] [--deterministic]
        [--quick] [--max-seconds S] [--no-charts]
    python -m jax_flash.bench --charts-from bench_results.json   # redraw the charts only
    python -m jax_flash.bench --ring [--devices N]   # ring attention over the visible devices

On a GPU it times the FlashAttention paper grid: batch × seqlen = 16384 tokens, hidden 2048, so
heads = 2048 / head_dim. On a CPU it times a small grid through jax-flash's XLA path (cuDNN rows are
skipped with a note), so the same command runs anywhere in well under a minute.

Passes: "fwd" times the attention itself; "fwd_bwd" times the value and (dq, dk, dv) gradients of
loss = sum(out.astype(float32) · dout) for a fixed standard-normal dout. An implementation that
cannot run a pass (no gradient yet, out of memory) gets a row with status "error: ...".

TFLOP/s = FLOPs / time. Forward FLOPs = 4·batch·heads·seqlen²·head_dim; the backward counts 2.5×
that and fwd_bwd 3.5×, as FlashAttention reports; all halved for causal. With --window, the
seqlen² is replaced by the number of (query, key) pairs the window (and causal) leave visible.
--kv-group G gives k and v heads / G heads (grouped-query attention). --softcap C caps the
scores at C·tanh(s / C) (Gemma 2); --alibi adds ALiBi biases with the usual slopes
2^(-8(h + 1) / heads); --dropout P drops each attention probability with probability P (the key
is jax.random.key(DROPOUT_KEY_SEED), and the oracle applies the very mask jax-flash draws from it).
jax.nn.dot_product_attention has none of these, so cuDNN and XLA skip those rows.
--key-padding F hides the last F·seqlen keys of every row (padding) with a dense boolean
[batch, 1, seqlen, seqlen] mask, the kind Flax builds, which every implementation takes as an
argument; FLOPs count the visible pairs. --bias adds a standard-normal bfloat16 bias of shape
[1, heads, seqlen, seqlen] (a learned per-head bias, as in T5), which every implementation takes;
fwd_bwd does not differentiate it (so jax-flash's backward computes no dbias).
--deterministic runs jax-flash's backward with deterministic=True (dq added in a fixed order);
the other implementations run as they are.

--segments N (packed sequences) replaces each configuration of seqlen S by two: "packed", the same
batch and seqlen with q_segment_ids cutting every row into N documents of S / N tokens, its FLOPs
counted on the visible pairs only (N·(S/N)² per batch and head; causal: N·(S/N)·(S/N + 1)/2); and
beside it the dense equivalent, batch·N sequences of S / N tokens. The packed row's "vs dense" is
its TFLOP/s over the dense equivalent's (same impl and pass); 1 means packing costs nothing.
cuDNN and XLA (jax.nn.dot_product_attention, which takes no segment ids) skip the packed rows.
"vs cuDNN" is cuDNN's time over this row's in the same pass (above 1: faster than cuDNN), measured
in the same run. Each row also carries its error against the float32 oracle on a slice (first
batch element, first two heads): "rel_err" is ‖x − ref‖₂ / ‖ref‖₂ with x = out for fwd, and the
largest of dq's, dk's and dv's for fwd_bwd; "max_abs_err" likewise.

After a run, one PNG per (pass, head dim) lands beside the JSON, e.g. bench_results_fwd_d128.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash import _bench_ring, _dropout
from jax_flash._reference import attention_reference

PAPER_TOKENS = 16384
PAPER_HIDDEN = 2048
PAPER_HEAD_DIMS = (64, 128, 256)
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 16384)

CPU_BATCH = 2
CPU_HEADS = 4
CPU_HEAD_DIMS = (64,)
CPU_SEQLENS = (256, 512)

PASSES = ("fwd", "fwd_bwd")
# FLOPs of a pass over the forward's: the backward does 2.5× the forward's matmul work.
PASS_FLOPS_PER_FORWARD = {"fwd": 1.0, "fwd_bwd": 3.5}

# flash: our kernel on a GPU (implementation="cuda"), our XLA path elsewhere.
# flash_xla: jax-flash's pure-JAX blockwise path, wherever it runs.
# cudnn, xla: jax.nn.dot_product_attention with that implementation.
IMPLS = ("flash", "flash_xla", "cudnn", "xla")
DEFAULT_IMPLS = ("flash", "cudnn", "xla")
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
CAUSAL_MODES = {"both": (False, True), "false": (False,), "true": (True,)}

# Plain XLA materializes batch·heads·seqlen² scores (tens of GB at 16k); past this it is skipped.
DEFAULT_XLA_MAX_SEQLEN = 8192
# Input sets the timed loop rotates through, so no call reads data the previous one left in L2.
INPUT_SETS = 3
# The oracle's slice: batch elements and heads compared, and query rows per oracle call.
ERROR_BATCH = 1
ERROR_HEADS = 2  # query heads; with grouped-query attention, one whole group of query heads
REFERENCE_CHUNK = 4096
# --dropout's PRNG key: fixed, so the oracle can draw the same mask as the timed calls.
DROPOUT_KEY_SEED = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark configuration: q is [batch, seqlen, num_heads, head_dim], k and v have
    num_heads / kv_group heads; window > 0 is a sliding window of that many keys on each side
    of the diagonal (-1: none); segments > 1 packs that many documents into each row."""

    batch: int
    seqlen: int
    num_heads: int
    head_dim: int
    causal: bool
    dtype: str
    kv_group: int = 1
    window: int = -1
    segments: int = 1  # > 1: q_segment_ids cut every row into this many equal documents
    softcap: float = 0.0  # > 0: scores capped at softcap·tanh(s / softcap)
    alibi: bool = False  # ALiBi with alibi_slopes(num_heads)
    dropout: float = 0.0  # > 0: attention probabilities dropped at this rate
    key_padding: float = 0.0  # > 0: this fraction of the keys, the last ones, hidden by a mask
    bias: bool = False  # a [1, num_heads, seqlen, seqlen] bfloat16 bias
    deterministic: bool = False  # jax-flash's backward with deterministic=True

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_group

    @property
    def window_size(self) -> tuple[int, int]:
        return (self.window, self.window) if self.window >= 0 else (-1, -1)

    @property
    def visible_keys(self) -> int:
        """Keys the padding mask leaves visible: the first ones, at least one."""
        return max(1, self.seqlen - round(self.key_padding * self.seqlen))

    @property
    def alibi_slopes(self) -> np.ndarray | None:
        """The ALiBi paper's slopes for num_heads heads, float32 [num_heads]; None without."""
        if not self.alibi:
            return None
        return np.exp2(-8.0 * np.arange(1, self.num_heads + 1) / self.num_heads).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    warmup_calls: int
    repeats: int
    # Calls per repeat are chosen so that one repeat lasts at least this long.
    min_repeat_seconds: float
    max_calls_per_repeat: int = 1000


FULL_TIMING = TimingSettings(warmup_calls=5, repeats=5, min_repeat_seconds=0.1)
QUICK_TIMING = TimingSettings(warmup_calls=3, repeats=3, min_repeat_seconds=0.05)


# --- The grid ---------------------------------------------------------------------------------

def paper_grid(head_dims, seqlens, causal_modes, dtype, **options) -> list[Shape]:
    """FlashAttention's setup: 16384 tokens per batch, hidden 2048."""
    return [Shape(batch=max(1, PAPER_TOKENS // seqlen), seqlen=seqlen,
                  num_heads=max(1, PAPER_HIDDEN // head_dim), head_dim=head_dim,
                  causal=causal, dtype=dtype, **options)
            for head_dim in head_dims for seqlen in seqlens for causal in causal_modes]


def cpu_grid(head_dims, seqlens, causal_modes, dtype, **options) -> list[Shape]:
    """A grid small enough for a CPU to finish in seconds."""
    return [Shape(batch=CPU_BATCH, seqlen=seqlen, num_heads=CPU_HEADS, head_dim=head_dim,
                  causal=causal, dtype=dtype, **options)
            for head_dim in head_dims for seqlen in seqlens for causal in causal_modes]


def build_grid(args, backend: str) -> list[tuple[Shape, ...]]:
    """The configurations, in groups timed and printed together: (shape,), or with --segments N
    (packed, dense equivalent)."""
    causal_modes = CAUSAL_MODES[args.causal]
    options = dict(kv_group=args.kv_group, window=args.window, softcap=args.softcap,
                   alibi=args.alibi, dropout=args.dropout, key_padding=args.key_padding,
                   bias=args.bias, deterministic=args.deterministic)
    if backend == "gpu":
        head_dims = args.head_dims or PAPER_HEAD_DIMS
        seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else PAPER_SEQLENS)
        grid = paper_grid(head_dims, seqlens, causal_modes, args.dtype, **options)
    else:
        grid = cpu_grid(args.head_dims or CPU_HEAD_DIMS, args.seqlens or CPU_SEQLENS,
                        causal_modes, args.dtype, **options)
    for shape in grid:
        if shape.num_heads % shape.kv_group:
            raise SystemExit(f"--kv-group {shape.kv_group} does not divide the "
                             f"{shape.num_heads} heads of head dim {shape.head_dim}")
    if args.softcap < 0:
        raise SystemExit(f"--softcap must be positive (or 0: off), not {args.softcap}")
    if not 0 <= args.dropout < 1:
        raise SystemExit(f"--dropout must be in [0, 1) (0: off), not {args.dropout}")
    if not 0 <= args.key_padding < 1:
        raise SystemExit(f"--key-padding must be in [0, 1) (0: off), not {args.key_padding}")
    if args.segments < 1:
        raise SystemExit(f"--segments must be 1 (off) or more, not {args.segments}")
    if args.segments > 1 and args.key_padding:
        raise SystemExit("--key-padding and --segments do not combine")
    if args.segments == 1:
        return [(shape,) for shape in grid]
    return [packed_group(shape, args.segments) for shape in grid]


def packed_group(shape: Shape, segments: int) -> tuple[Shape, Shape]:
    """`shape` packed with `segments` equal documents per row, and its dense equivalent: the
    same documents as batch·segments rows of their own."""
    if shape.seqlen % segments:
        raise SystemExit(f"--segments {segments} does not divide seqlen {shape.seqlen}: every "
                         f"row must hold {segments} documents of equal length")
    packed = dataclasses.replace(shape, segments=segments)
    dense = dataclasses.replace(shape, batch=shape.batch * segments,
                                seqlen=shape.seqlen // segments)
    return packed, dense


def visible_pairs(shape: Shape) -> int:
    """(query, key) pairs that causal, the window, the segments and the key padding leave
    visible, per (batch, head). A query sees keys of its own segment only, and causal and the
    window are relative to the diagonal, so each segment leaves what a row of its own length
    would."""
    length = shape.seqlen // shape.segments
    rows = np.arange(length)
    left, right = shape.window_size
    if shape.causal:
        right = 0
    first = np.maximum(rows - left, 0) if left >= 0 else np.zeros_like(rows)
    last = np.minimum(rows + right, length - 1) if right >= 0 else np.full_like(rows, length - 1)
    last = np.minimum(last, shape.visible_keys - 1)
    return shape.segments * int(np.sum(np.maximum(last - first + 1, 0)))


def forward_flops(shape: Shape) -> float:
    """Two matmuls of 2·seqlen²·head_dim per (batch, head); causal counts exactly half (as
    FlashAttention reports), a window or segments the pairs they leave visible."""
    if shape.window >= 0 or shape.segments > 1 or shape.key_padding:
        pairs = visible_pairs(shape)
    else:
        pairs = shape.seqlen ** 2 / (2 if shape.causal else 1)
    return 4.0 * shape.batch * shape.num_heads * pairs * shape.head_dim


def pass_flops(shape: Shape, pass_: str) -> float:
    return PASS_FLOPS_PER_FORWARD[pass_] * forward_flops(shape)


# --- The implementations ----------------------------------------------------------------------

def extra_names(shape: Shape) -> tuple[str, ...]:
    """The keyword arguments attention takes after q, k and v, in the order bench_shape passes
    them: q_segment_ids with segments, mask with key padding, bias."""
    used = (shape.segments > 1, bool(shape.key_padding), shape.bias)
    return tuple(name for name, on in zip(("q_segment_ids", "mask", "bias"), used) if on)


def attention_fn(impl: str, shape: Shape, softmax_scale: float, backend: str):
    """(q, k, v, *extras) -> out for `impl` (extras named by extra_names), and the path it takes
    ("cuda", "cudnn" or "xla")."""
    if impl in ("flash", "flash_xla"):
        # "cuda", not None: a row labelled cuda must fail rather than fall back to XLA.
        path = "cuda" if impl == "flash" and backend == "gpu" else "xla"
        fn = functools.partial(jax_flash.flash_attention, causal=shape.causal,
                               softmax_scale=softmax_scale, implementation=path,
                               window_size=shape.window_size, softcap=shape.softcap,
                               alibi_slopes=shape.alibi_slopes, dropout_rate=shape.dropout,
                               dropout_rng=jax.random.key(DROPOUT_KEY_SEED) if shape.dropout
                               else None, deterministic=shape.deterministic)
    else:
        window = shape.window_size if shape.window >= 0 else None
        fn = functools.partial(jax.nn.dot_product_attention, is_causal=shape.causal,
                               scale=softmax_scale, implementation=impl, local_window_size=window)
        path = impl
    names = extra_names(shape)
    return (lambda q, k, v, *extras: fn(q, k, v, **dict(zip(names, extras)))), path


def pass_fn(pass_: str, attention):
    """The function a pass times. It returns a tuple whose leading entries the oracle checks:
    (out,) for fwd; (dq, dk, dv, loss) for fwd_bwd, whose inputs carry dout after q, k and v.
    Any further inputs (segment ids, mask, bias) go to `attention` after q, k and v: as
    arguments, not constants, so that XLA cannot fold their preprocessing out of the timed
    call."""
    if pass_ == "fwd":
        return lambda q, k, v, *ids: (attention(q, k, v, *ids),)

    def loss(q, k, v, dout, *ids):
        return jnp.sum(attention(q, k, v, *ids).astype(jnp.float32) * dout)

    # The loss is returned so that XLA cannot drop the forward's P·V product, which no gradient
    # needs: without it, plain XLA would do less work than the FLOPs credited to it.
    def grads_and_loss(q, k, v, dout, *ids):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, dout, *ids)
        return (*grads, value)

    return grads_and_loss


def skip_reason(impl: str, shape: Shape, backend: str, xla_max_seqlen: int,
                deadline: float) -> str | None:
    if impl in ("cudnn", "xla") and shape.segments > 1:
        # A [b, 1, s, s] mask would stand in for them, but that is no longer the fused kernel.
        return "jax.nn.dot_product_attention takes no segment ids"
    if impl in ("cudnn", "xla") and shape.softcap:
        return "jax.nn.dot_product_attention takes no softcap"
    if impl in ("cudnn", "xla") and shape.alibi:
        return "jax.nn.dot_product_attention takes no ALiBi slopes"
    if impl in ("cudnn", "xla") and shape.dropout:
        return "jax.nn.dot_product_attention takes no dropout"
    if impl == "cudnn" and backend != "gpu":
        return "cuDNN needs an NVIDIA GPU"
    if impl == "xla" and shape.seqlen > xla_max_seqlen:
        return f"seqlen > --xla-max-seqlen {xla_max_seqlen}"
    if time.perf_counter() > deadline:
        return "--max-seconds spent"
    return None


# --- Inputs, timing and errors ----------------------------------------------------------------

def random_inputs(shape: Shape, key) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Standard-normal q, k, v: never zeros, which hide wrong results and can run faster."""
    heads = (shape.num_heads, shape.num_kv_heads, shape.num_kv_heads)
    return tuple(jax.random.normal(part, (shape.batch, shape.seqlen, h, shape.head_dim),
                                   DTYPES[shape.dtype])
                 for part, h in zip(jax.random.split(key, 3), heads))


def time_per_call(fn, input_sets, settings: TimingSettings) -> tuple[float, int]:
    """Median seconds per call of the jitted `fn`, and the calls timed per repeat.

    Each repeat dispatches its calls back to back and blocks once at the end, so the device runs
    them without host gaps and the time is the device's own (dispatch is asynchronous).
    """
    for i in range(settings.warmup_calls):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    start = time.perf_counter()
    jax.block_until_ready(fn(*input_sets[0]))
    estimate = time.perf_counter() - start
    calls = max(len(input_sets), math.ceil(settings.min_repeat_seconds / max(estimate, 1e-6)))
    calls = min(calls, settings.max_calls_per_repeat)

    per_call = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call), calls


def padding_mask(shape: Shape) -> jax.Array | None:
    """bool [batch, 1, seqlen, seqlen]: True where the key is one of the first visible_keys; None
    without key padding."""
    if not shape.key_padding:
        return None
    keys = np.arange(shape.seqlen) < shape.visible_keys
    return jnp.asarray(np.broadcast_to(keys, (shape.batch, 1, shape.seqlen, shape.seqlen)))


def attention_bias(shape: Shape, key) -> jax.Array | None:
    """--bias's bfloat16 [1, heads, seqlen, seqlen], standard normal; None without."""
    if not shape.bias:
        return None
    dims = (1, shape.num_heads, shape.seqlen, shape.seqlen)
    return jax.random.normal(key, dims, jnp.bfloat16)


def segment_ids(shape: Shape) -> jax.Array | None:
    """int32 [batch, seqlen] q_segment_ids: document i holds tokens [i·L, (i + 1)·L) of every
    row, L = seqlen / segments; None without segments."""
    if shape.segments == 1:
        return None
    ids = np.repeat(np.arange(shape.segments, dtype=np.int32), shape.seqlen // shape.segments)
    return jnp.asarray(np.broadcast_to(ids, (shape.batch, shape.seqlen)))


def random_cotangent(shape: Shape, key) -> jax.Array:
    """fwd_bwd's dout: float32 standard normal, like the loss it multiplies."""
    dims = (shape.batch, shape.seqlen, shape.num_heads, shape.head_dim)
    return jax.random.normal(key, dims, jnp.float32)


def error_slice(x: jax.Array, axis: str, kv_group: int) -> jax.Array:
    """The oracle's slice of a query-side ("q": q, out, dq, dout) or key-side ("k") array: the
    first ERROR_HEADS query heads, or with grouped-query attention the first group, and the kv
    heads they read."""
    q_heads = ERROR_HEADS if kv_group == 1 else kv_group
    heads = q_heads if axis == "q" else q_heads // kv_group
    return x[:ERROR_BATCH, :, :heads]


_STATIC = ("causal", "softmax_scale", "window_size", "softcap", "dropout_rate")


def _reference_fwd(q, k, v, dout, *, causal, softmax_scale, window_size, softcap, mask=None,
                   bias=None, dropout_rate=0.0, dropout_keep=None, q_segment_ids=None,
                   kv_segment_ids=None):
    out, _ = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                 window_size=window_size, softcap=softcap, mask=mask, bias=bias,
                                 dropout_rate=dropout_rate, dropout_keep=dropout_keep,
                                 q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids)
    return (out,)


def _reference_loss(q, k, v, dout, **options):
    return jnp.sum(_reference_fwd(q, k, v, dout, **options)[0] * dout)


# Per pass: the oracle, and which of its outputs run along the queries (a chunk's rows are final)
# or along the keys (a chunk adds its part to every key it sees).
_REFERENCES = {
    "fwd": (jax.jit(_reference_fwd, static_argnames=_STATIC), ("q",)),
    "fwd_bwd": (jax.jit(jax.grad(_reference_loss, argnums=(0, 1, 2)), static_argnames=_STATIC),
                ("q", "k", "k")),
}


def reference_outputs(pass_: str, q, k, v, dout, *, causal: bool, softmax_scale: float,
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes=None, q_segment_ids=None, dropout_rate: float = 0.0,
                      dropout_seed=None, visible_keys: int | None = None,
                      bias=None) -> list[np.ndarray]:
    """The float32 oracle's (out,) or (dq, dk, dv), computed on the host CPU (apart from the device
    under test, and with no autotuning per shape), REFERENCE_CHUNK query rows at a time to bound
    its memory. The loss is a sum over query rows, so the chunks' gradients add up to the whole's.

    The bench's shapes are square (seqlen_q == seqlen_k). For causal, the queries [start, stop) see
    no key at or past `stop`; handing the oracle only keys [0, stop) keeps its bottom-right
    alignment equal to the full problem's. A chunk's window and ALiBi would be aligned to the
    chunk's own bottom-right corner, so they go to the oracle as a mask and a bias over global
    positions instead (alibi_slopes: [heads] of the sliced heads).
    q_segment_ids [batch, seqlen] (kv's are the same) are cut along with the queries and keys.
    With dropout_rate > 0, dropout_seed (uint32 [batch, 2]: dropout_seed(rng, full batch)'s rows
    of the sliced batch elements) gives each chunk the part of the mask flash_attention draws for
    the whole problem (the sliced heads must be its first ones). visible_keys: only the first
    this many keys are visible (key padding). bias: [1, sliced heads, seqlen, seqlen], added to
    the scores.
    """
    cpu = jax.devices("cpu")[0]
    q, k, v, dout = (jax.device_put(x, cpu).astype(jnp.float32) for x in (q, k, v, dout))
    if q_segment_ids is not None:  # on the host too, with the oracle's other inputs
        q_segment_ids = np.asarray(q_segment_ids)
    if dropout_seed is not None:
        dropout_seed = jax.device_put(dropout_seed, cpu)
    if bias is not None:
        bias = np.asarray(bias, np.float32)
    oracle, axes = _REFERENCES[pass_]
    totals = [np.zeros(q.shape if axis == "q" else k.shape, np.float32) for axis in axes]
    seqlen = q.shape[1]
    for start in range(0, seqlen, REFERENCE_CHUNK):
        stop = min(start + REFERENCE_CHUNK, seqlen)
        keys = stop if causal else seqlen
        ids = {} if q_segment_ids is None else dict(q_segment_ids=q_segment_ids[:, start:stop],
                                                    kv_segment_ids=q_segment_ids[:, :keys])
        parts = oracle(q[:, start:stop], k[:, :keys], v[:, :keys], dout[:, start:stop],
                       causal=causal, softmax_scale=softmax_scale, window_size=(-1, -1),
                       softcap=softcap,
                       mask=_chunk_mask(window_size, start, stop, keys, visible_keys),
                       bias=_chunk_bias(alibi_slopes, bias, start, stop, keys),
                       dropout_rate=_dropout.quantize_rate(dropout_rate),
                       dropout_keep=_dropout_keep(dropout_seed, dropout_rate, seqlen, q.shape[2],
                                                  start, stop, keys), **ids)
        for axis, total, part in zip(axes, totals, parts):
            if axis == "q":
                total[:, start:stop] = part
            else:
                total[:, :keys] += part
    return totals


def _chunk_bias(alibi_slopes, bias, start: int, stop: int, keys: int) -> np.ndarray | None:
    """[1, heads, stop − start, keys]: −slope·|i − j| for query start + i and key j (square
    shapes) plus the bias's part; None without slopes or bias."""
    total = None if bias is None else bias[:, :, start:stop, :keys]
    if alibi_slopes is None:
        return total
    distance = np.abs(np.arange(start, stop)[:, None] - np.arange(keys)[None, :]).astype(np.float32)
    alibi = -np.asarray(alibi_slopes)[None, :, None, None] * distance
    return alibi if total is None else alibi + total


# Jitted so that XLA fuses the Philox rounds rather than materializing each at [chunk, keys].
_keep_mask = jax.jit(_dropout.keep_mask, static_argnames=("rate", "seqlen_q", "kv_heads", "group"))


def _dropout_keep(seed, rate: float, seqlen: int, heads: int, start: int, stop: int,
                  keys: int) -> jax.Array | None:
    """bool [batch, heads, stop − start, keys]: the keep mask of queries [start, stop) and keys
    [0, keys) in a problem of `seqlen` queries; None without dropout. Each head is a group of
    one: the mask is per query head."""
    if not rate:
        return None
    keep = _keep_mask(seed, rate, seqlen_q=seqlen, kv_heads=heads, group=1,
                      query=jnp.arange(start, stop), key=jnp.arange(keys))
    return keep.reshape(seed.shape[0], heads, stop - start, keys)


def _chunk_mask(window_size, start: int, stop: int, keys: int,
                visible_keys: int | None = None) -> np.ndarray | None:
    """[stop − start, keys] True where query start + i sees key j under window_size (square
    shapes: the diagonal is j = i) and j < visible_keys; None without a window or padding."""
    left, right = window_size
    if (left, right) == (-1, -1) and visible_keys is None:
        return None
    rows, cols = np.arange(start, stop)[:, None], np.arange(keys)[None, :]
    visible = np.broadcast_to(cols < (keys if visible_keys is None else visible_keys),
                              (stop - start, keys)).copy()
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    return visible


def output_errors(pass_: str, outputs, references, kv_group: int) -> tuple[float, float]:
    """The largest, over the checked outputs, of max |x − ref| and of ‖x − ref‖₂ / ‖ref‖₂."""
    max_abs, rel = 0.0, 0.0
    for x, ref, axis in zip(outputs, references, _REFERENCES[pass_][1]):
        diff = np.asarray(error_slice(x, axis, kv_group), np.float32) - ref
        max_abs = max(max_abs, float(np.abs(diff).max()))
        rel = max(rel, float(np.linalg.norm(diff) / np.linalg.norm(ref)))
    return max_abs, rel


# --- One configuration ------------------------------------------------------------------------

def bench_shape(shape: Shape, impls, passes, settings: TimingSettings, backend: str,
                xla_max_seqlen: int, deadline: float, key) -> list[dict]:
    """One row per (pass, impl): its time and error, or why it was skipped or failed."""
    input_sets = [random_inputs(shape, part) for part in jax.random.split(key, INPUT_SETS)]
    dout = random_cotangent(shape, jax.random.fold_in(key, INPUT_SETS))
    ids = segment_ids(shape)
    # What attention takes after q, k and v (extra_names).
    bias = attention_bias(shape, jax.random.fold_in(key, INPUT_SETS + 1))
    extra = tuple(x for x in (ids, padding_mask(shape), bias) if x is not None)
    # flash_attention draws one seed per element of the whole batch; the oracle's slice takes its
    # elements' seeds.
    seed = (_dropout.dropout_seed(jax.random.key(DROPOUT_KEY_SEED), shape.batch)[:ERROR_BATCH]
            if shape.dropout else None)
    softmax_scale = 1.0 / math.sqrt(shape.head_dim)
    rows = []
    for pass_ in passes:
        inputs = [(*qkv, *extra) if pass_ == "fwd" else (*qkv, dout, *extra)
                  for qkv in input_sets]
        reasons = {impl: skip_reason(impl, shape, backend, xla_max_seqlen, deadline)
                   for impl in impls}
        if not all(reasons.values()):
            sliced = [error_slice(x, axis, shape.kv_group)
                      for x, axis in zip((*input_sets[0], dout), ("q", "k", "k", "q"))]
            reference = reference_outputs(pass_, *sliced, causal=shape.causal,
                                          softmax_scale=softmax_scale,
                                          window_size=shape.window_size,
                                          softcap=shape.softcap,
                                          alibi_slopes=None if not shape.alibi else
                                          shape.alibi_slopes[:sliced[0].shape[2]],
                                          q_segment_ids=None if ids is None else
                                          ids[:ERROR_BATCH],
                                          dropout_rate=shape.dropout, dropout_seed=seed,
                                          visible_keys=shape.visible_keys
                                          if shape.key_padding else None,
                                          bias=None if bias is None else
                                          bias[:, :sliced[0].shape[2]])
        for impl in impls:
            row = {"impl": impl, "pass": pass_, **dataclasses.asdict(shape)}
            if reasons[impl]:
                rows.append({**row, "status": f"skipped: {reasons[impl]}"})
                continue
            attention, row["path"] = attention_fn(impl, shape, softmax_scale, backend)
            start = time.perf_counter()
            try:
                jitted = jax.jit(pass_fn(pass_, attention))
                seconds, calls = time_per_call(jitted, inputs, settings)
                max_abs_err, rel_err = output_errors(pass_, jitted(*inputs[0]), reference,
                                                     shape.kv_group)
            except Exception as e:  # noqa: BLE001 - a failing impl (OOM, no gradient) is a result
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                rows.append({**row, "status": f"error: {type(e).__name__}: {message}"[:300]})
                continue
            rows.append({**row, "status": "ok", "ms": seconds * 1e3,
                         "tflops": pass_flops(shape, pass_) / seconds / 1e12,
                         "calls_per_repeat": calls, "repeats": settings.repeats,
                         "max_abs_err": max_abs_err, "rel_err": rel_err,
                         # compiling, warming up, timing and the error check together
                         "wall_seconds": time.perf_counter() - start})
    return rows


# --- Reporting --------------------------------------------------------------------------------

TABLE_HEADER = (f"{'impl':<10} {'pass':<7} {'path':<6} {'d':>4} {'seqlen':>6} {'seg':>3} "
                f"{'b×h':>7} {'causal':<6} {'ms':>9} {'TFLOP/s':>8} {'vs cuDNN':>8} "
                f"{'vs dense':>8} {'max|err|':>9} {'rel err':>8}  note")


def format_row(row: dict, cudnn_ms: float | None) -> str:
    shape = (f"{row['impl']:<10} {row['pass']:<7} {row.get('path', '-'):<6} "
             f"{row['head_dim']:>4} {row['seqlen']:>6} {row.get('segments', 1):>3} "
             f"{row['batch']:>3}×{row['num_heads']:<3} {'yes' if row['causal'] else 'no':<6}")
    if row["status"] != "ok":
        return f"{shape} {'':>9} {'':>8} {'':>8} {'':>8} {'':>9} {'':>8}  {row['status']}"
    ratio = (f"{cudnn_ms / row['ms']:.2f}x"
             if cudnn_ms is not None and row["impl"] != "cudnn" else "")
    vs_dense = f"{row['vs_dense']:.2f}x" if "vs_dense" in row else ""
    return (f"{shape} {row['ms']:>9.3f} {row['tflops']:>8.4g} {ratio:>8} {vs_dense:>8} "
            f"{row['max_abs_err']:>9.2e} {row['rel_err']:>8.1e}")


def format_shape_rows(rows: list[dict]) -> list[str]:
    """Table lines of one configuration's rows; speed is also given relative to cuDNN's in the
    same pass."""
    cudnn_ms = {r["pass"]: r["ms"] for r in rows if r["impl"] == "cudnn" and r["status"] == "ok"}
    return [format_row(row, cudnn_ms.get(row["pass"])) for row in rows]


def add_vs_dense(packed_rows: list[dict], dense_rows: list[dict]) -> None:
    """Gives each packed row that ran "vs_dense": its TFLOP/s (on the useful FLOPs) over that of
    the dense equivalent's row of the same impl and pass, where that one ran too."""
    dense = {(r["impl"], r["pass"]): r["tflops"] for r in dense_rows if r["status"] == "ok"}
    for row in packed_rows:
        if row["status"] == "ok" and (row["impl"], row["pass"]) in dense:
            row["vs_dense"] = row["tflops"] / dense[row["impl"], row["pass"]]


def run_metadata(argv, backend: str, dtype: str, passes, settings: TimingSettings) -> dict:
    device = jax.devices()[0]
    return {
        "device": device.device_kind,
        "platform": backend,
        "jax_version": jax.__version__,
        "jaxlib_version": importlib.metadata.version("jaxlib"),
        "jax_flash_kernels": jax_flash.kernel_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "jax_flash.bench", *argv]),
        "dtype": dtype,
        "passes": list(passes),
        "timing": dataclasses.asdict(settings),
        "flops": "fwd: 4*batch*heads*seqlen^2*head_dim, halved for causal (with a window or "
                 "segments > 1: the visible pairs instead of seqlen^2); fwd_bwd: 3.5x fwd",
        "error": f"vs float32 oracle on batch[:{ERROR_BATCH}], query heads[:{ERROR_HEADS}] "
                 "(with GQA, the first group); "
                 "fwd_bwd: the worst of dq, dk, dv, for loss = sum(out * dout)",
        "rows": [],
    }


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")


# --- Command line -----------------------------------------------------------------------------

def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item)


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item for item in text.split(",") if item)
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {choices}")
        return items
    return parse


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jax_flash.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results.json",
                        help="JSON file of every row; the charts go beside it")
    parser.add_argument("--passes", type=_choice_list(PASSES), default=PASSES,
                        help=f"comma list of {PASSES} (default both)")
    parser.add_argument("--head-dims", type=_int_list,
                        help=f"comma list (GPU default {PAPER_HEAD_DIMS}, CPU {CPU_HEAD_DIMS})")
    parser.add_argument("--seqlens", type=_int_list,
                        help=f"comma list (GPU default {PAPER_SEQLENS}, --quick {QUICK_SEQLENS}, "
                             f"CPU {CPU_SEQLENS})")
    parser.add_argument("--impls", type=_choice_list(IMPLS), default=DEFAULT_IMPLS,
                        help=f"comma list of {IMPLS} (default {','.join(DEFAULT_IMPLS)})")
    parser.add_argument("--causal", choices=tuple(CAUSAL_MODES), default="both")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--kv-group", type=int, default=1,
                        help="query heads per kv head (grouped-query attention; default 1)")
    parser.add_argument("--window", type=int, default=-1,
                        help="sliding window: keys within W of the diagonal on each side "
                             "(with causal, to the left only); default none")
    parser.add_argument("--segments", type=int, default=1, metavar="N",
                        help="packed sequences: time each seqlen S as N documents of S / N "
                             "tokens per row (segment ids) next to its dense equivalent, batch·N "
                             "rows of S / N; 'vs dense' compares the two (default 1: off)")
    parser.add_argument("--softcap", type=float, default=0.0, metavar="C",
                        help="cap the scores at C·tanh(s / C) (default 0: off)")
    parser.add_argument("--alibi", action="store_true",
                        help="ALiBi with slopes 2^(-8(h + 1) / heads) (default off)")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="drop each attention probability with probability P in [0, 1) "
                             "(default 0: off)")
    parser.add_argument("--key-padding", type=float, default=0.0, metavar="F",
                        help="hide the last F·seqlen keys with a dense [batch, 1, seqlen, seqlen] "
                             "mask (0: off)")
    parser.add_argument("--bias", action="store_true",
                        help="add a bfloat16 [1, heads, seqlen, seqlen] standard-normal bias")
    parser.add_argument("--deterministic", action="store_true",
                        help="jax-flash's backward with deterministic=True")
    parser.add_argument("--quick", action="store_true",
                        help="fewer seqlens and shorter timing, for a first look")
    parser.add_argument("--xla-max-seqlen", type=int, default=DEFAULT_XLA_MAX_SEQLEN,
                        help="skip plain XLA above this seqlen (it materializes the scores)")
    parser.add_argument("--max-seconds", type=float, default=math.inf,
                        help="past this many seconds of run, skip the rows not yet started")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-charts", action="store_true", help="write no PNG charts")
    parser.add_argument("--charts-from", metavar="JSON",
                        help="only redraw the charts of an earlier run's JSON, beside it")
    parser.add_argument("--ring", action="store_true",
                        help="multi-device mode: causal ring attention with the sequence split "
                             "over the devices, per-device TFLOP/s next to one device's (GPU "
                             f"default seqlen {_bench_ring.GPU_RING_SEQLENS}, head dim "
                             f"{_bench_ring.GPU_RING_HEAD_DIMS})")
    parser.add_argument("--devices", type=int,
                        help="--ring: use the first N devices (default all)")
    return parser.parse_args(argv)


def write_charts(report: dict, json_path: str) -> None:
    try:
        from jax_flash._bench_chart import write_charts as write
    except ImportError as e:  # matplotlib is optional; the JSON holds every number anyway
        print(f"# no charts: {e}", flush=True)
        return
    for path in write(report, json_path):
        print(f"# wrote {path}", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.charts_from:
        with open(args.charts_from) as f:
            write_charts(json.load(f), args.charts_from)
        return
    deadline = time.perf_counter() + args.max_seconds
    backend = jax.default_backend()
    settings = QUICK_TIMING if args.quick else FULL_TIMING
    if args.ring:
        run_ring(args, argv, backend, settings)
        return
    groups = build_grid(args, backend)
    report = run_metadata(argv, backend, args.dtype, args.passes, settings)

    packed = (f"; seg {args.segments}: rows packed with {args.segments} documents, FLOPs of the "
              f"visible pairs, 'vs dense' over the dense equivalent's below"
              if args.segments > 1 else "")
    print(f"# {report['device']} ({backend}), jax {report['jax_version']}, {args.dtype}, "
          f"{sum(map(len, groups))} configurations × passes {','.join(args.passes)}; TFLOP/s = "
          f"4·b·h·s²·d / time for fwd, 3.5× that for fwd_bwd (causal: half); errors vs the "
          f"float32 oracle{packed}", flush=True)
    print(TABLE_HEADER, flush=True)
    keys = iter(jax.random.split(jax.random.key(args.seed), sum(map(len, groups))))
    for group in groups:
        results = [bench_shape(shape, args.impls, args.passes, settings, backend,
                               args.xla_max_seqlen, deadline, next(keys)) for shape in group]
        if len(results) == 2:
            add_vs_dense(*results)
        for rows in results:
            report["rows"].extend(rows)
            print("\n".join(format_shape_rows(rows)), flush=True)
        # Written after every configuration, so a run cut short keeps what it measured.
        write_json(args.out, report)
    print(f"# wrote {args.out}", flush=True)
    if not args.no_charts:
        write_charts(report, args.out)


def run_ring(args, argv, backend: str, settings: TimingSettings) -> None:
    for flag, value in (("--segments", args.segments != 1), ("--key-padding", args.key_padding),
                        ("--bias", args.bias)):
        if value:
            raise SystemExit(f"{flag} is not a --ring option")
    devices = jax.devices()[:args.devices]
    gpu = backend == "gpu"
    shapes = _bench_ring.ring_shapes(
        args.seqlens or (_bench_ring.GPU_RING_SEQLENS if gpu else _bench_ring.CPU_RING_SEQLENS),
        args.head_dims or (_bench_ring.GPU_RING_HEAD_DIMS if gpu
                           else _bench_ring.CPU_RING_HEAD_DIMS),
        args.dtype, Shape)
    report = run_metadata(argv, backend, args.dtype, args.passes, settings)
    report["devices"] = len(devices)
    print(f"# ring attention over {len(devices)} × {report['device']} ({backend}), causal, "
          f"zigzag; TFLOP/s per device; 'vs 1 dev': over flash_attention on one device at "
          f"seqlen / {len(devices)}", flush=True)
    print(_bench_ring.RING_HEADER, flush=True)
    for shape in shapes:
        rows = _bench_ring.bench_ring_shape(shape, args.passes, settings, devices, backend,
                                            sys.modules[__name__])
        report["rows"].extend(rows)
        write_json(args.out, report)
        print("\n".join(_bench_ring.format_ring_rows(rows)), flush=True)
    print(f"# wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
