"""FlashAttention for JAX: CUDA kernels as XLA FFI custom calls, with a pure-JAX path everywhere else.

    import jax_flash
    out = jax_flash.flash_attention(q, k, v, causal=True)  # [batch, seqlen, heads, head_dim]
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)  # loss calling flash_attention
    print(jax_flash.kernel_info())  # what this install can run
"""

from jax_flash._attention import RESIDUAL_NAMES, flash_attention
from jax_flash._extension import kernel_info
from jax_flash._merge import merge_attention_states
from jax_flash._reference import attention_reference
from jax_flash._ring import ring_attention
from jax_flash._segments import cu_seqlens_to_segment_ids, segment_ids_to_cu_seqlens
from jax_flash._varlen import flash_attention_varlen
from jax_flash._zigzag import from_zigzag, to_zigzag

__version__ = "0.1.0"

__all__ = ["RESIDUAL_NAMES", "attention_reference", "flash_attention", "kernel_info",
           "merge_attention_states", "ring_attention", "to_zigzag", "from_zigzag",
           "flash_attention_varlen", "cu_seqlens_to_segment_ids", "segment_ids_to_cu_seqlens"]
