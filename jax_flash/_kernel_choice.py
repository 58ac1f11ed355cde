"""Whether a CUDA lowering runs our kernels or the blockwise XLA path, shared by the forward and
backward primitives: the implementation asked for, the features, the dtype, this build, the GPU,
the head dim.

The kernels run plain and causal attention, grouped-query attention, sliding windows, softcap,
ALiBi, segment ids and flash_attention_varlen (and sinks, which flash_attention applies around
them); ALiBi with varlen's positions takes the XLA path (its distances are per sequence).
Every other feature takes the XLA path until the kernels gain it; implementation="cuda" then
raises, naming the features.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _extension
from jax_flash._config import FlashConfig
from jax_flash._kernel_ranges import kernel_ranges
from jax_flash._validation import KERNEL_DTYPES, check_kernel_dtype

# The kernels use instructions of Ampere (sm_80) and newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


@functools.cache
def _min_compute_capability() -> tuple[int, int] | None:
    """The oldest visible CUDA GPU's compute capability; None when lowering for CUDA without one."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None
    return min(tuple(int(part) for part in d.compute_capability.split(".")) for d in devices)


def _kernel_head_dim(head_dim: int) -> int | None:
    """The smallest compiled head dim that holds `head_dim`; inputs are zero-padded up to it."""
    return min((d for d in _extension.kernel_head_dims() if d >= head_dim), default=None)


def _why_kernel_cannot_run(head_dim: int) -> str | None:
    """Why this install and GPU cannot run the kernels for half-precision inputs; None if they can."""
    if not _extension.kernels_built():
        return _extension.why_no_kernels()
    capability = _min_compute_capability()
    if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]} and the "
                f"kernels need {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
    if _kernel_head_dim(head_dim) is None:
        return (f"head_dim {head_dim} is larger than every head dim this build compiled "
                f"{_extension.kernel_head_dims()}")
    return None


# FlashConfig.features() that the kernels run.
KERNEL_FEATURES = ("window_size", "softcap", "alibi_slopes", "segment_ids", "flash_attention_varlen")


def _missing_features(config: FlashConfig) -> tuple[str, ...]:
    missing = [f for f in config.features() if f not in KERNEL_FEATURES]
    # The kernels measure ALiBi's distance in whole-row indices, not in per-token positions.
    if config.has_alibi_slopes and config.has_positions:
        missing.append("alibi_slopes with flash_attention_varlen")
    return tuple(missing)


def check_kernel_features(config: FlashConfig) -> None:
    """For implementation="cuda": raises ValueError naming the features the kernels lack."""
    missing = _missing_features(config)
    if missing:
        raise ValueError(
            f"jax-flash: implementation='cuda' cannot run {', '.join(missing)}: the CUDA kernels "
            "do not have these features yet; use implementation=None or 'xla' for the XLA path")


def kernel_head_dim_for(q_aval, config: FlashConfig) -> int | None:
    """The compiled head dim to run q's attention at on CUDA, or None for the XLA path.

    implementation="cuda" raises when the kernels cannot run; None (auto) falls back, warning
    once unless the reason is a feature the kernels lack (that fallback is documented).
    """
    if config.implementation == "xla":
        return None
    if config.implementation == "cuda":
        check_kernel_features(config)
    elif _missing_features(config):
        return None
    if jnp.dtype(q_aval.dtype) not in KERNEL_DTYPES:
        if config.implementation == "cuda":
            check_kernel_dtype(q_aval.dtype)
        return None
    head_dim = q_aval.shape[3]
    reason = _why_kernel_cannot_run(head_dim)
    if reason is not None:
        if config.implementation == "cuda":
            raise RuntimeError(f"jax-flash: implementation='cuda' cannot run: {reason}")
        _extension.warn_fallback_once(reason)
        return None
    return _kernel_head_dim(head_dim)


def pad_head_dim(x, kernel_head_dim: int):
    """Zero-pads the last axis to kernel_head_dim: dot products and P·V are unchanged."""
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, kernel_head_dim - x.shape[-1]),))


def kernel_feature_arguments(config: FlashConfig, extras, *, backward: bool):
    """(FFI attributes alibi, causal, window_left, window_right; the operands that follow the
    kernel's fixed ones) for the primitive's extra operands `extras`.

    alibi_slopes float32 [b, h] comes first when there are slopes. Segment ids (and varlen's
    positions) become per-token intervals (see _kernel_ranges). With positions, the intervals carry
    causal and window_size per sequence, so the kernel's own band, aligned to the whole row, is
    turned off.
    """
    named = dict(zip(config.extra_operand_names(), extras))
    left, right = config.window_size
    attributes = dict(alibi=bool(config.has_alibi_slopes), causal=bool(config.causal),
                      window_left=np.int32(left), window_right=np.int32(right))
    operands = (named["alibi_slopes"],) if config.has_alibi_slopes else ()
    if not config.has_segment_ids:
        return attributes, operands
    positions = ((named["q_positions"], named["kv_positions"]) if config.has_positions
                 else (None, None))
    row_ranges, key_ranges = kernel_ranges(named["q_segment_ids"], named["kv_segment_ids"],
                                           *positions, causal=config.causal,
                                           window_size=config.window_size)
    if config.has_positions:
        attributes.update(causal=False, window_left=np.int32(-1), window_right=np.int32(-1))
    kv_segment_ids = named["kv_segment_ids"].astype(jnp.int32)
    operands += ((row_ranges, key_ranges, kv_segment_ids) if backward
                 else (row_ranges, kv_segment_ids))
    return attributes, operands
