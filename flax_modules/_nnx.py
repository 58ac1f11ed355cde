"""FlashMultiHeadAttention: nnx's MultiHeadAttention on jax-flash, with causal/window/softcap
options and chunked KV-cache decoding."""

import functools

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_kernel_init

from jax_flash.flax_modules import _kv_cache
from jax_flash.flax_modules._attention_fn import flash_attention_fn


class FlashMultiHeadAttention(nnx.Module):
    """Multi-head attention with nnx.MultiHeadAttention's constructor, call and attribute names
    (query, key, value, out, query_ln, key_ln), computed by jax_flash.flash_attention.

    A model switches by changing the class name: the state (nnx.state(module)) of one loads into
    the other. Not taken from nnx.MultiHeadAttention: attention_fn, the promote_dtype and
    metadata hooks, the deprecated dot_general arguments, set_view; sow_weights=True raises
    (the weights never exist). decode=None means False.

    Extras (keyword-only): causal (bottom-right aligned, see jax_flash.flash_attention; under
    jax.jit prefer it, or is_causal=True, to a causal mask, which is traced there and read tile
    by tile), window_size (left, right) with -1 unbounded, softcap, implementation (None, "cuda"
    or "xla").

    Decoding: `init_cache((batch, max_length, features), dtype)` creates cached_key, cached_value
    [batch, max_length, num_kv_heads, head_dim] and cache_lengths [batch] int32 (nnx.Cache). Each
    call with decode=True appends a chunk [batch, chunk, features] (one token or many) to every
    sequence at its own length; chunk_lengths [batch] says how many of the chunk's tokens are real
    (default all; the outputs of the padding mean nothing). Queries see the cached keys up to
    their own position, so decoding is causal whatever `causal` says. A real token whose
    position is past max_length gets NaN (padding stays finite).
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None,
                 in_kv_features: int | None = None, *, dtype=None, param_dtype=jnp.float32,
                 broadcast_dropout: bool = True, dropout_rate: float = 0.0,
                 deterministic: bool | None = None, precision=None,
                 kernel_init=default_kernel_init, out_kernel_init=None,
                 bias_init=nnx.initializers.zeros_init(), out_bias_init=None,
                 use_bias: bool = True, decode: bool | None = None, normalize_qk: bool = False,
                 rngs: nnx.Rngs, keep_rngs: bool = True, causal: bool = False,
                 window_size: tuple[int, int] | None = None, softcap: float | None = None,
                 implementation: str | None = None):
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features or in_features
        self.out_features = out_features or in_features
        self.in_kv_features = in_kv_features or in_features
        self.num_kv_heads = num_kv_heads or num_heads
        if self.qkv_features % num_heads:
            raise ValueError(f"jax-flash: qkv_features ({self.qkv_features}) must be divisible "
                             f"by num_heads ({num_heads})")
        if num_heads % self.num_kv_heads:
            raise ValueError(f"jax-flash: num_heads ({num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        self.head_dim = self.qkv_features // num_heads
        self.dtype = dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.decode = decode
        self.normalize_qk = normalize_qk
        self.causal = causal
        self.window_size = window_size
        self.softcap = softcap
        self.implementation = implementation

        linear = functools.partial(
            nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, precision=precision, rngs=rngs)
        self.query = linear(in_features, (num_heads, self.head_dim))
        self.key = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        self.value = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        if normalize_qk:
            layer_norm = functools.partial(nnx.LayerNorm, self.head_dim, use_bias=False,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.query_ln, self.key_ln = layer_norm(), layer_norm()
        else:
            self.query_ln = self.key_ln = nnx.data(None)
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            rngs=rngs)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        self.cached_key = self.cached_value = self.cache_lengths = nnx.data(None)

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
                 rngs=None, sow_weights=False, decode=None, is_causal=False, out_sharding=None,
                 qkv_sharding=None, chunk_lengths=None, q_segment_ids=None,
                 kv_segment_ids=None):
        """inputs_q [batch..., length, in_features]; inputs_k and inputs_v default to inputs_q
        and inputs_k. mask: broadcastable to [batch..., num_heads, length_q, length_kv] (True
        keeps). is_causal: as nnx (query i sees key j <= i). chunk_lengths: [batch] valid tokens
        per sequence of a decoding chunk. q_segment_ids [batch..., length_q] and kv_segment_ids
        [batch..., length_kv] (default q's when the lengths match): packed sequences, as
        flash_attention_fn; not with decode=True."""
        decode = self.decode if decode is None else decode
        inputs_k, inputs_v = _kv_cache.resolve_call_inputs(
            inputs_q, inputs_k, inputs_v, decode, q_segment_ids, kv_segment_ids)
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"jax-flash: inputs_q has {inputs_q.shape[-1]} features (shape "
                             f"{inputs_q.shape}); the module expects {self.in_features}")
        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)

        dropout_rng = None
        deterministic = True if self.dropout_rate == 0.0 else (
            deterministic if deterministic is not None else self.deterministic)
        if deterministic is None:
            raise ValueError("jax-flash: dropout_rate > 0 needs deterministic, in the "
                             "constructor or the call")
        if not deterministic:
            rngs = self.rngs if rngs is None else rngs
            if rngs is None:
                raise ValueError("jax-flash: dropout needs rngs in the call when the module was "
                                 "built with keep_rngs=False")
            dropout_rng = (rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs)()
        attend = functools.partial(
            flash_attention_fn, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
            deterministic=deterministic, dtype=self.dtype, module=self if sow_weights else None,
            window_size=self.window_size, softcap=self.softcap,
            implementation=self.implementation)

        if decode:
            if self.cached_key is None:
                raise ValueError("jax-flash: decoding needs a cache; call init_cache first")
            cache = (self.cached_key, self.cached_value, self.cache_lengths)
            x, new_cache = _kv_cache.decode(
                query, key, value, tuple(c[...] for c in cache), chunk_lengths, mask,
                self.window_size, functools.partial(_kv_cache.attend_cached, attend))
            for variable, new_value in zip(cache, new_cache):
                variable[...] = new_value
        else:
            x = attend(query, key, value, mask=mask, is_causal=is_causal, causal=self.causal,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
        return self.out(x, out_sharding=out_sharding)

    def init_cache(self, input_shape, dtype=jnp.float32):
        """Creates an empty cache for inputs of shape (batch, max_length, features)."""
        if len(input_shape) != 3:
            raise ValueError("jax-flash: init_cache takes input_shape (batch, max_length, "
                             f"features); got {tuple(input_shape)}")
        batch, max_length = input_shape[:2]
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))
