"""Input checks of flash_attention: each failure names the argument and the shapes it saw.

The checks read only `.shape` and `.dtype`, so they run at trace time on arrays, tracers and
abstract values alike.
"""

import math
import numbers

import jax.numpy as jnp
import numpy as np

from jax_flash._config import IMPLEMENTATIONS

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


def check_qkv(q, k, v) -> None:
    """Raises ValueError for shapes and TypeError for dtypes that no implementation takes."""
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

    for axis, dim in ((0, "batch"), (3, "head_dim")):
        if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            raise ValueError(
                f"jax-flash: q, k and v must have the same {dim} (axis {axis}); "
                f"got {_describe(q, k, v)}")
    if not q.shape[2] == k.shape[2] == v.shape[2]:
        raise ValueError(
            "jax-flash: q, k and v must have the same number of heads (axis 2); grouped-query "
            f"attention (fewer kv heads) is not supported yet; got {_describe(q, k, v)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"jax-flash: k and v must have the same seqlen (axis 1); got {_describe(q, k, v)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(
            f"jax-flash: head_dim {q.shape[3]} of q is larger than {MAX_HEAD_DIM}, the largest "
            f"head_dim jax-flash supports; got {_describe(q, k, v)}")

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
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(
            "jax-flash: softmax_scale must be a static Python or NumPy real number; "
            f"got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
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
