"""The compiled module jax_flash._C: what it was built with, and its FFI targets registered with XLA.

A source tree that was never built has no _C; that is a working CPU install with no kernels.
"""

import dataclasses
import importlib
import warnings

import jax

# The targets the lowerings call; see _fwd_primitive and _bwd_primitive for their contracts.
FWD_TARGET = "jax_flash_fwd"
BWD_TARGET = "jax_flash_bwd"
SEGMENT_RANGES_TARGET = "jax_flash_segment_ranges"  # see _kernel_ranges


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What this install can run. `reason` says why there are no kernels ("" when there are)."""

    kernels: bool
    reason: str
    cuda_archs: tuple[str, ...]
    head_dims: tuple[int, ...]


def _load() -> BuildInfo:
    try:
        compiled = importlib.import_module("jax_flash._C")
    except ModuleNotFoundError as err:
        if err.name != "jax_flash._C":
            raise
        return BuildInfo(False, "jax_flash._C is not built", (), ())
    except ImportError as err:  # built, but a library it links against is missing
        return BuildInfo(False, f"jax_flash._C failed to import: {err}", (), ())

    info = compiled.build_info()
    if not info["cuda"]:
        return BuildInfo(False, info["reason"] or "jax_flash._C was built without CUDA", (), ())
    targets = compiled.registrations()
    missing = [name for name in (FWD_TARGET, BWD_TARGET, SEGMENT_RANGES_TARGET)
               if name not in targets]
    if missing:
        return BuildInfo(False, f"jax_flash._C registers no {missing[0]!r} target", (), ())
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return BuildInfo(
        kernels=True,
        reason="",
        cuda_archs=tuple(info["cuda_archs"]),
        head_dims=tuple(sorted(info["head_dims"])),
    )


BUILD = _load()
_warned_reasons = set()


def kernels_built() -> bool:
    return BUILD.kernels


def kernel_head_dims() -> tuple[int, ...]:
    return BUILD.head_dims


def why_no_kernels() -> str:
    return BUILD.reason


def kernel_info() -> dict:
    """What this install of jax-flash can run; print it to check an install."""
    return {
        "kernels_built": BUILD.kernels,
        "cuda_archs": list(BUILD.cuda_archs),
        "head_dims": list(BUILD.head_dims),
        "reason": BUILD.reason,
    }


def warn_fallback_once(reason: str) -> None:
    """Says once per reason that attention lowered for CUDA takes the XLA path, not the kernels."""
    if reason in _warned_reasons:
        return
    _warned_reasons.add(reason)
    warnings.warn(
        f"jax-flash: flash_attention on CUDA takes the slower XLA path because {reason}; "
        "jax_flash.kernel_info() shows what this install was built with",
        RuntimeWarning,
    )
