"""Static options of one attention call, held together so primitives carry a single hashable param."""

import dataclasses

# None picks the kernel when it can run and the XLA path otherwise.
IMPLEMENTATIONS = (None, "cuda", "xla")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """What flash_attention was asked for, after defaults are resolved.

    causal: key j is visible to query i iff j <= i + seqlen_k - seqlen_q (bottom-right aligned).
    softmax_scale: multiplies q·k before the softmax; resolved from the original head_dim.
    implementation: one of IMPLEMENTATIONS.
    deterministic: the backward must be bitwise reproducible (the CUDA backward kernel then
      reduces dq in a fixed order instead of with atomics); the forward ignores it.
    """

    causal: bool
    softmax_scale: float
    implementation: str | None
    deterministic: bool = False
