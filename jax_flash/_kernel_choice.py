"""Whether a CUDA lowering runs our kernels or the blockwise XLA path, shared by the forward and
backward primitives: the implementation asked for, the features, the dtype, this build, the GPU,
the head dim.

The kernels run plain and causal attention, grouped-query attention, sliding windows, softcap,
ALiBi, dropout, mask, bias, segment ids and flash_attention_varlen (and sinks, which
flash_attention applies around them). ALiBi with varlen's positions takes the XLA path (its
distances are per sequence), and so does bias with softcap (the kernel adds the bias before the
cap); so does the deterministic backward of a differentiated bias that broadcasts (the kernel
adds its gradient atomically). implementation="cuda" raises where a pass cannot run on the
kernels, naming the features.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _extension
from jax_flash._config import FlashConfig
from jax_flash._dropout import rate_threshold
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
KERNEL_FEATURES = ("window_size", "softcap", "alibi_slopes", "mask", "bias", "dropout_rate",
                   "segment_ids", "flash_attention_varlen")
# Bias dtypes the kernels read; others are cast to float32 (in the bias's own shape).
KERNEL_BIAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _missing_features(config: FlashConfig, backward: bool,
                      broadcast_bias: bool) -> tuple[str, ...]:
    missing = [f for f in config.features() if f not in KERNEL_FEATURES]
    if backward and config.deterministic and broadcast_bias and config.bias_grad:
        missing.append("deterministic=True with a bias that broadcasts (its gradient)")
    # The kernels measure ALiBi's distance in whole-row indices, not in per-token positions.
    if config.has_alibi_slopes and config.has_positions:
        missing.append("alibi_slopes with flash_attention_varlen")
    # They start q·kᵀ from the bias, which the cap would then cap too.
    if config.has_bias and config.softcap:
        missing.append("bias with softcap")
    return tuple(missing)


def check_kernel_features(config: FlashConfig, backward: bool = False,
                          broadcast_bias: bool = False) -> None:
    """For implementation="cuda": raises ValueError naming the features the kernels lack (those
    of the forward pass, or with `backward` of the backward pass; broadcast_bias: the bias has a
    dimension of size 1 that broadcasts)."""
    missing = _missing_features(config, backward, broadcast_bias)
    if missing:
        raise ValueError(
            f"jax-flash: implementation='cuda' cannot run {', '.join(missing)}: the CUDA kernels "
            "do not have these features yet; use implementation=None or 'xla' for the XLA path")


def kernel_head_dim_for(q_aval, config: FlashConfig, backward: bool = False,
                        broadcast_bias: bool = False) -> int | None:
    """The compiled head dim to run q's attention (its backward pass, with `backward`) at on
    CUDA, or None for the XLA path (broadcast_bias as check_kernel_features's).

    implementation="cuda" raises when the kernels cannot run; None (auto) falls back, warning
    once unless the reason is a feature the kernels lack (that fallback is documented).
    """
    if config.implementation == "xla":
        return None
    if config.implementation == "cuda":
        check_kernel_features(config, backward, broadcast_bias)
    elif _missing_features(config, backward, broadcast_bias):
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


# Keys per row of the packed mask are a multiple of this (kMaskRowKeys in cuda/flash_params.h).
_MASK_ROW_KEYS = 128


def pack_mask_bits(mask, seqlen_k: int):
    """bool [b | 1, h | 1, sq | 1, sk | 1] -> uint32 [b | 1, h | 1, sq | 1, words], key j's bit
    j % 32 of word j / 32, rows padded with hidden keys to a multiple of _MASK_ROW_KEYS: one pass
    over the mask, which the kernels then read 32 keys per load (and skip tiles by)."""
    mask = jnp.broadcast_to(mask, mask.shape[:3] + (seqlen_k,))
    keys = -(-seqlen_k // _MASK_ROW_KEYS) * _MASK_ROW_KEYS
    mask = jnp.pad(mask, ((0, 0),) * 3 + ((0, keys - seqlen_k),))
    bits = mask.reshape(mask.shape[:3] + (keys // 32, 32)).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def kernel_feature_arguments(config: FlashConfig, extras, seqlen_k: int, *, backward: bool):
    """(FFI attributes alibi, mask, bias, causal, window_left, window_right, dropout_threshold;
    the operands that follow the kernel's fixed ones) for the primitive's extra operands `extras`.

    alibi_slopes float32 [b, h] comes first when there are slopes, then the mask as bits
    (pack_mask_bits) and the bias (float32, float16 or bfloat16), each in its own 4-D shape
    broadcastable to [b, h, sq, sk] (the kernel reads broadcast dimensions with stride 0),
    then dropout_seed uint32 [b, 2] with dropout (the rate as a 16-bit threshold, see _dropout).
    Segment ids (and varlen's positions) become per-token intervals (see _kernel_ranges). With
    positions, the intervals carry causal and window_size per sequence, so the kernel's own
    band, aligned to the whole row, is turned off.
    """
    named = dict(zip(config.extra_operand_names(), extras))
    left, right = config.window_size
    attributes = dict(alibi=bool(config.has_alibi_slopes), causal=bool(config.causal),
                      window_left=np.int32(left), window_right=np.int32(right),
                      dropout_threshold=np.int32(rate_threshold(config.dropout_rate)))
    attributes.update(mask=bool(config.has_mask), bias=bool(config.has_bias))
    operands = (named["alibi_slopes"],) if config.has_alibi_slopes else ()
    if config.has_mask:
        operands += (pack_mask_bits(named["mask"], seqlen_k),)
    if config.has_bias:
        bias = named["bias"]
        operands += (bias if bias.dtype in KERNEL_BIAS_DTYPES else bias.astype(jnp.float32),)
    if config.dropout_rate:
        operands += (named["dropout_seed"],)
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
