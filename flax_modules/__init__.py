"""jax-flash for Flax (shipped as jax_flash.flax_modules; needs flax).

    from jax_flash.flax_modules import flash_attention_fn
    nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=flash_attention_fn)   # linen
    nnx.MultiHeadAttention(8, 512, attention_fn=flash_attention_fn, rngs=rngs)      # nnx

or the modules, which add GQA, causal/window/softcap options and chunked KV-cache decoding with
per-sequence lengths: FlashMultiHeadDotProductAttention (linen), FlashMultiHeadAttention (nnx).
"""

from jax_flash.flax_modules._attention_fn import flash_attention_fn
from jax_flash.flax_modules._linen import FlashMultiHeadDotProductAttention
from jax_flash.flax_modules._nnx import FlashMultiHeadAttention

__all__ = ["FlashMultiHeadAttention", "FlashMultiHeadDotProductAttention", "flash_attention_fn"]
