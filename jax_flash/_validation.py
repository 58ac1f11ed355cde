"""Input checks of flash_attention: each failure names the argument and the shapes it saw.

The checks read only `.shape` and `.dtype`, so they run at trace time on arrays, tracers and
abstract values alike.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._config import IMPLEMENTATIONS
from jax_flash._dropout import quantize_rate

# The largest head_dim of any implementation; the kernels are compiled up to it.
MAX_HEAD_DIM = 256

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
# What the CUDA kernels take; other dtypes run on the XLA path.
KERNEL_DTYPES = (jnp.float16, jnp.bfloat16)

_DIM_NAMES = ("batch", "seqlen", "heads", "head_dim")


def _describe(q, k, v) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def _dtype_names(dtypes) -> str:
    names = [jnp.dtype(d).name for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_qkv(q, k, v, *, value_head_dim_may_differ: bool = False) -> None:
    """Raises ValueError for shapes and TypeError for dtypes that no implementation takes.
    value_head_dim_may_differ: v's head_dim need not be q's and k's (flash_attention pads)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(
                f"jax-flash: {name} must be 4-D [batch, seqlen, heads, head_dim]; "
                f"got {_describe(q, k, v)}")
        empty = [dim for dim, size in zip(_DIM_NAMES, x.shape) if size == 0]
        if empty:
            raise ValueError(
                f"jax-flash: {name} has an empty {' and '.join(empty)} dimension "
                f"(shape {tuple(x.shape)}); every dimension must be at least 1")

    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(
            f"jax-flash: q, k and v must have the same batch (axis 0); got {_describe(q, k, v)}")
    if value_head_dim_may_differ and q.shape[3] != k.shape[3]:
        raise ValueError(
            f"jax-flash: q and k must have the same head_dim (axis 3); v's may differ; got "
            f"{_describe(q, k, v)}")
    if not value_head_dim_may_differ and not q.shape[3] == k.shape[3] == v.shape[3]:
        raise ValueError(
            f"jax-flash: q, k and v must have the same head_dim (axis 3); got {_describe(q, k, v)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"jax-flash: k and v must have the same number of heads (axis 2); got "
            f"{_describe(q, k, v)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"jax-flash: the heads of k and v (axis 2) must divide the heads of q: grouped-query "
            f"attention gives each kv head an equal group of query heads; got {_describe(q, k, v)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"jax-flash: k and v must have the same seqlen (axis 1); got {_describe(q, k, v)}")
    for name, x in (("q", q), ("v", v)):
        if x.shape[3] > MAX_HEAD_DIM:
            raise ValueError(
                f"jax-flash: head_dim {x.shape[3]} of {name} is larger than {MAX_HEAD_DIM}, the "
                f"largest head_dim jax-flash supports; got {_describe(q, k, v)}")

    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise TypeError(
                f"jax-flash: {name} has dtype {jnp.dtype(x.dtype).name}; flash_attention takes "
                f"{_dtype_names(SUPPORTED_DTYPES)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            "jax-flash: q, k and v must have the same dtype; got "
            f"q {jnp.dtype(q.dtype).name}, k {jnp.dtype(k.dtype).name}, "
            f"v {jnp.dtype(v.dtype).name}")


def _static_real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"jax-flash: {name} must be a static Python or NumPy real number; "
            f"got {type(value).__name__}")
    return float(value)


def check_window_size(window_size) -> tuple[int, int]:
    """(left, right) as Python ints, each -1 (unbounded) or a number of keys >= 0."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_))
                       for w in window_size)):
        raise TypeError(
            "jax-flash: window_size must be a pair of static ints (left, right); "
            f"got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(
            "jax-flash: window_size entries must be >= 0, or -1 for unbounded; "
            f"got {window_size!r}")
    return left, right


def check_softcap(softcap) -> float:
    softcap = _static_real("softcap", softcap)
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"jax-flash: softcap must be finite and >= 0 (0: off); got {softcap!r}")
    return softcap


def check_dropout(dropout_rate, dropout_rng) -> float:
    """dropout_rate in [0, 1) as the rate the mask draws (a multiple of 1/256, see _dropout); a
    rate above 0 needs a PRNG key."""
    rate = _static_real("dropout_rate", dropout_rate)
    if not 0 <= rate < 1:
        raise ValueError(f"jax-flash: dropout_rate must be in [0, 1); got {dropout_rate!r}")
    if rate > 0 and dropout_rng is None:
        raise ValueError("jax-flash: dropout_rate > 0 needs dropout_rng, a JAX PRNG key")
    if dropout_rng is not None:
        typed = jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key)
        if not (typed and dropout_rng.shape == ()) and not (
                dropout_rng.dtype == jnp.uint32 and dropout_rng.shape == (2,)):
            raise TypeError(
                "jax-flash: dropout_rng must be one PRNG key (jax.random.key(seed), or "
                f"jax.random.PRNGKey(seed): uint32[2]); got "
                f"{jnp.dtype(dropout_rng.dtype).name}{list(dropout_rng.shape)}")
    return quantize_rate(rate)


def check_sinks(sinks, heads: int) -> None:
    """sinks: one logit per query head."""
    if tuple(sinks.shape) != (heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(
            f"jax-flash: sinks must be a float array [heads] = [{heads}] (one logit per query "
            f"head of q); got {jnp.dtype(sinks.dtype).name}{list(sinks.shape)}")


def check_alibi_slopes(alibi_slopes, batch: int, heads: int) -> None:
    shape = tuple(alibi_slopes.shape)
    if shape not in ((heads,), (batch, heads)) or not jnp.issubdtype(alibi_slopes.dtype,
                                                                   jnp.floating):
        raise ValueError(
            f"jax-flash: alibi_slopes must be a float array [heads] = [{heads}] or "
            f"[batch, heads] = [{batch}, {heads}] (the query heads of q); got "
            f"{jnp.dtype(alibi_slopes.dtype).name}{list(shape)}")


def check_broadcastable(name: str, x, target: tuple[int, ...], kind) -> None:
    """mask and bias: `kind` (jnp.bool_ or jnp.floating) and broadcastable to `target`, which is
    [batch, heads, seqlen_q, seqlen_k], as jax.nn.dot_product_attention takes them."""
    shape = tuple(x.shape)
    padded = (1,) * (len(target) - len(shape)) + shape
    if len(shape) > len(target) or any(s not in (1, t) for s, t in zip(padded, target)):
        raise ValueError(
            f"jax-flash: {name} of shape {list(shape)} does not broadcast to [batch, heads, "
            f"seqlen_q, seqlen_k] = {list(target)} (heads: those of q)")
    if not jnp.issubdtype(x.dtype, kind):
        wanted = "boolean" if kind is jnp.bool_ else "floating-point"
        raise TypeError(
            f"jax-flash: {name} must be {wanted}; got {jnp.dtype(x.dtype).name}{list(shape)}")


def check_extra_operands(q, k, names, extras) -> None:
    """The primitives' feature operands as flash_attention prepares them: alibi_slopes float32
    [b, h], mask and bias 4-D broadcastable to [b, h, sq, sk], q_segment_ids and q_positions
    int32 [b, sq], kv_segment_ids and kv_positions int32 [b, sk], dropout_seed uint32 [b, 2]."""
    if len(names) != len(extras):
        raise ValueError(f"jax-flash: expected the operands {names}; got {len(extras)} of them")
    batch, seqlen_q, heads, _ = q.shape
    scores = (batch, heads, seqlen_q, k.shape[1])
    for name, x in zip(names, extras):
        if name == "alibi_slopes":
            ok = tuple(x.shape) == (batch, heads) and x.dtype == jnp.float32
        elif name == "dropout_seed":
            ok = tuple(x.shape) == (batch, 2) and x.dtype == jnp.uint32
        elif name in ("q_segment_ids", "q_positions", "kv_segment_ids", "kv_positions"):
            seqlen = seqlen_q if name.startswith("q_") else k.shape[1]
            ok = tuple(x.shape) == (batch, seqlen) and x.dtype == jnp.int32
        else:
            ok = len(x.shape) == 4
            check_broadcastable(name, x, scores, jnp.bool_ if name == "mask" else jnp.floating)
        if not ok:
            raise ValueError(
                f"jax-flash: the operand {name} has an unexpected "
                f"{jnp.dtype(x.dtype).name}{list(x.shape)} for q {list(q.shape)}")


def check_segment_ids(name: str, segment_ids, batch: int, seqlen: int, of: str) -> None:
    """q_segment_ids / kv_segment_ids: integers [batch, seqlen] of q (`of` = "q") or k."""
    got = f"{jnp.dtype(segment_ids.dtype).name}{list(segment_ids.shape)}"
    if tuple(segment_ids.shape) != (batch, seqlen):
        raise ValueError(
            f"jax-flash: {name} must be [batch, seqlen_{of}] = [{batch}, {seqlen}] (axes 0 and 1 "
            f"of {of}); got {got}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"jax-flash: {name} must be an integer array (int32); got {got}")


def check_kernel_dtype(dtype) -> None:
    """For implementation="cuda": the kernels take half precision only."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        raise TypeError(
            f"jax-flash: implementation='cuda' needs q, k and v in "
            f"{_dtype_names(KERNEL_DTYPES)}; got {jnp.dtype(dtype).name} "
            "(use implementation=None to fall back to the XLA path)")


def check_softmax_scale(softmax_scale) -> float | None:
    """Returns softmax_scale as a Python float (None stays None: the default is resolved later)."""
    if softmax_scale is None:
        return None
    scale = _static_real("softmax_scale", softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"jax-flash: softmax_scale must be positive and finite; got {softmax_scale!r}")
    return scale


def check_flag(name: str, value) -> bool:
    """causal and return_lse choose what is traced, so they must be static booleans."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"jax-flash: {name} must be a Python bool; got {type(value).__name__}")
    return bool(value)


def check_implementation(implementation) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"jax-flash: implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")


def check_common_options(q, k, v, implementation, softmax_scale, return_lse, *,
                         value_head_dim_may_differ: bool = False):
    """The checks every attention entry point makes: shapes and dtypes, the implementation (and
    the kernels' dtypes when it is "cuda"), the scale and return_lse. Returns (scale, return_lse)."""
    check_qkv(q, k, v, value_head_dim_may_differ=value_head_dim_may_differ)
    check_implementation(implementation)
    if implementation == "cuda":
        check_kernel_dtype(q.dtype)
    return check_softmax_scale(softmax_scale), check_flag("return_lse", return_lse)
