"""FlashMultiHeadDotProductAttention: linen's MultiHeadDotProductAttention on jax-flash, with GQA,
causal/window/softcap options and chunked KV-cache decoding."""

import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import default_kernel_init

from jax_flash.flax_modules import _kv_cache
from jax_flash.flax_modules._attention_fn import flash_attention_fn


class FlashMultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with linen.MultiHeadDotProductAttention's fields, call and parameter
    names (query, key, value, out, query_ln, key_ln), computed by jax_flash.flash_attention.

    A model using Flax's module switches by changing the class name: parameters load unchanged
    (with num_kv_heads = num_heads). Not taken from Flax's module: the attention_fn field, the
    einsum factories, force_fp32_for_softmax (the softmax is float32 anyway), the deprecated
    dot_general fields and inputs_kv argument; sow_weights=True raises (the weights never exist).

    Extras:
      causal: every call is causal (bottom-right aligned, see jax_flash.flash_attention). Under
        jax.jit prefer this to a causal mask, which is traced there and read tile by tile.
      window_size: (left, right) sliding window, -1 unbounded.
      num_kv_heads: key/value heads (GQA/MQA); divides num_heads. Default num_heads.
      softcap: scores become softcap * tanh(scores / softcap).
      implementation: as in jax_flash.flash_attention (None, "cuda" or "xla").

    Decoding (decode=True): `init` with inputs [batch, max_length, features] creates the cache
    (collection "cache": cached_key, cached_value [batch, max_length, num_kv_heads, head_dim] and
    cache_lengths [batch] int32, the valid tokens of each sequence). Each later `apply(...,
    mutable=["cache"])` appends a chunk [batch, chunk, features] (one token or many) to every
    sequence at its own length, with chunk_lengths [batch] saying how many of the chunk's tokens
    are real (default all; the rest are padding whose outputs mean nothing). Queries see the
    cached keys up to their own position, so decoding is causal whatever `causal` says. A real
    token whose position is past max_length gets NaN (padding stays finite).
    """

    num_heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    out_kernel_init: Callable | None = None
    bias_init: Callable = nn.initializers.zeros_init()
    out_bias_init: Callable | None = None
    use_bias: bool = True
    decode: bool = False
    normalize_qk: bool = False
    causal: bool = False
    window_size: tuple[int, int] | None = None
    num_kv_heads: int | None = None
    softcap: float | None = None
    implementation: str | None = None

    @nn.compact
    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
                 dropout_rng=None, sow_weights=False, chunk_lengths=None, q_segment_ids=None,
                 kv_segment_ids=None):
        """inputs_q [batch..., length, features]; inputs_k and inputs_v default to inputs_q and
        inputs_k. mask: broadcastable to [batch..., num_heads, length_q, length_kv] (True keeps).
        chunk_lengths: [batch] valid tokens per sequence of a decoding chunk. q_segment_ids
        [batch..., length_q] and kv_segment_ids [batch..., length_kv] (default q's when the
        lengths match): packed sequences, as flash_attention_fn; not with decode=True."""
        inputs_k, inputs_v = _kv_cache.resolve_call_inputs(
            inputs_q, inputs_k, inputs_v, self.decode, q_segment_ids, kv_segment_ids)
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        num_kv_heads = self.num_kv_heads or self.num_heads
        if qkv_features % self.num_heads:
            raise ValueError(f"jax-flash: qkv_features ({qkv_features}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.num_heads % num_kv_heads:
            raise ValueError(f"jax-flash: num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({num_kv_heads})")
        head_dim = qkv_features // self.num_heads

        dense = functools.partial(
            nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
            precision=self.precision)
        query = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
        key = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
        value = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
        if self.normalize_qk:
            layer_norm = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                                           param_dtype=self.param_dtype)
            query = layer_norm(name="query_ln")(query)
            key = layer_norm(name="key_ln")(key)

        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            deterministic = True
        attend = functools.partial(
            flash_attention_fn, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
            deterministic=deterministic, dtype=self.dtype, module=self if sow_weights else None,
            window_size=self.window_size, softcap=self.softcap,
            implementation=self.implementation)

        if self.decode and self.has_variable("cache", "cached_key"):
            cache = (self.variable("cache", "cached_key"), self.variable("cache", "cached_value"),
                     self.variable("cache", "cache_lengths"))
            x, new_cache = _kv_cache.decode(
                query, key, value, tuple(c.value for c in cache), chunk_lengths, mask,
                self.window_size, functools.partial(_kv_cache.attend_cached, attend))
            for variable, new_value in zip(cache, new_cache):
                variable.value = new_value
        else:
            if self.decode:  # initializing: the input's length is the cache's max_length
                if key.ndim != 4:
                    raise ValueError("jax-flash: decoding takes inputs [batch, length, features]"
                                     f"; got inputs_k of shape {inputs_k.shape}")
                self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
                self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
                self.variable("cache", "cache_lengths", jnp.zeros, key.shape[:1], jnp.int32)
            x = attend(query, key, value, mask=mask, causal=self.causal,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)

        return nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            name="out")(x)
