"""KV-cache decoding: feeding a sequence token by token or in chunks, with different lengths per
sequence, gives what the full sequence gives at once (causal); the cache is updated in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_flash.flax_modules import (  # noqa: E402
    FlashMultiHeadAttention,
    FlashMultiHeadDotProductAttention,
    _kv_cache,
)

TOL = dict(rtol=5e-5, atol=5e-5)
BATCH, MAX_LENGTH, FEATURES = 2, 16, 24
HEADS, KV_HEADS, QKV_FEATURES = 4, 2, 40

# (chunk size, valid tokens of each sequence's chunk): sequences advance at different speeds,
# and each sequence's total stays within MAX_LENGTH.
ONE_BY_ONE = [(1, (1, 1))] * 5 + [(1, (1, 0))] * 3 + [(1, (0, 1))] + [(1, (1, 1))] * 3
CHUNKED = [(4, (4, 2)), (1, (1, 1)), (4, (3, 4)), (4, (4, 0)), (1, (0, 1))]


def _tokens(length, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((BATCH, length, FEATURES)), jnp.float32)


def _feed(step, x, schedule):
    """Runs step(chunk [batch, c, features], chunk_lengths [batch]) -> out over the schedule,
    slicing each sequence's chunk at its own position (padding is random tokens), and returns the
    outputs of the valid tokens placed at their positions, plus each sequence's final length."""
    rng = np.random.default_rng(1)
    positions = np.zeros(BATCH, int)
    outputs = np.full((BATCH, MAX_LENGTH, FEATURES), np.nan, np.float32)
    for chunk_size, lengths in schedule:
        chunk = rng.standard_normal((BATCH, chunk_size, FEATURES)).astype(np.float32)
        for b, n in enumerate(lengths):
            chunk[b, :n] = x[b, positions[b]:positions[b] + n]
        out = np.asarray(step(jnp.asarray(chunk), jnp.asarray(lengths, jnp.int32)))
        for b, n in enumerate(lengths):
            outputs[b, positions[b]:positions[b] + n] = out[b, :n]
        positions += lengths
    return outputs, positions


def _assert_prefixes_equal(outputs, positions, full):
    for b, length in enumerate(positions):
        np.testing.assert_allclose(outputs[b, :length], full[b, :length], **TOL)


def _linen_module(**fields):
    return FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES,
                                             num_kv_heads=KV_HEADS, **fields)


def test_linen_decode_one_by_one_equals_full_sequence():
    decoder = _linen_module(decode=True)
    variables = jax.jit(decoder.init)(jax.random.key(0), jnp.zeros((BATCH, MAX_LENGTH,
                                                                     FEATURES)))
    assert variables["cache"]["cached_key"].shape == (BATCH, MAX_LENGTH, KV_HEADS, 10)
    x = _tokens(MAX_LENGTH)
    full = jax.jit(_linen_module(causal=True).apply)({"params": variables["params"]}, x)

    @jax.jit
    def step(variables, chunk, chunk_lengths):
        out, cache = decoder.apply(variables, chunk, chunk_lengths=chunk_lengths,
                                   mutable=["cache"])
        return out, {"params": variables["params"], **cache}

    def run(chunk, chunk_lengths):
        nonlocal variables
        out, variables = step(variables, chunk, chunk_lengths)
        return out

    outputs, positions = _feed(run, x, ONE_BY_ONE)
    np.testing.assert_array_equal(variables["cache"]["cache_lengths"], positions)
    _assert_prefixes_equal(outputs, positions, full)


def _nnx_decoder(**extras):
    module = FlashMultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, num_kv_heads=KV_HEADS,
                                     rngs=nnx.Rngs(0), **extras)
    module.init_cache((BATCH, MAX_LENGTH, FEATURES))
    return module


def _donating_step(module):
    """A jitted decoding step that donates the cache, as a generation loop should."""
    graphdef, params, cache = nnx.split(module, nnx.Param, nnx.Cache)

    @jax.jit
    def step(params, cache, chunk, chunk_lengths):
        module = nnx.merge(graphdef, params, cache)
        out = module(chunk, decode=True, chunk_lengths=chunk_lengths)
        return out, nnx.state(module, nnx.Cache)

    return params, cache, jax.jit(step, donate_argnums=1)


def test_nnx_chunked_decode_with_window_and_softcap_equals_full_sequence():
    module = _nnx_decoder(window_size=(5, 0), softcap=3.0)
    x = _tokens(MAX_LENGTH, seed=2)
    full = nnx.jit(lambda module, x: module(x, is_causal=True))(module, x)
    params, cache, step = _donating_step(module)

    def run(chunk, chunk_lengths):
        nonlocal cache
        out, cache = step(params, cache, chunk, chunk_lengths)
        return out

    outputs, positions = _feed(run, x, CHUNKED)
    np.testing.assert_array_equal(cache["cache_lengths"][...], positions)
    _assert_prefixes_equal(outputs, positions, full)


def test_nnx_decode_step_updates_the_donated_cache_in_place():
    module = _nnx_decoder()
    params, cache, step = _donating_step(module)
    chunk, lengths = _tokens(1), jnp.ones((BATCH,), jnp.int32)
    hlo = step.lower(params, cache, chunk, lengths).compile().as_text()
    aliases = hlo.split("input_output_alias=", 1)[1].split("entry_computation_layout", 1)[0]
    assert aliases.count("-alias)") == 3  # cached_key, cached_value, cache_lengths
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)]
    _, new_cache = step(params, cache, chunk, lengths)
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new_cache)]
    assert before == after


def test_overflowing_the_cache_gives_nan_not_a_truncated_answer():
    """Through _kv_cache.decode with a plain masked mean as the attention: a chunk running past
    max_length keeps the cached prefix intact and gives NaN where its keys were dropped."""
    values = jnp.asarray(np.random.default_rng(3).standard_normal((BATCH, 7, 1, 2)),
                         jnp.float32)
    cache = (jnp.zeros((BATCH, 5, 1, 2)), jnp.zeros((BATCH, 5, 1, 2)),
             jnp.zeros((BATCH,), jnp.int32))

    def masked_mean(query, key, value, visible):  # [b, 1, c, max_length] -> [b, c, 1, 2]
        weights = visible[:, 0] / visible[:, 0].sum(-1, keepdims=True)
        return jnp.einsum("bck,bkhd->bchd", weights, value)

    @jax.jit
    def feed(chunk, cache):
        return _kv_cache.decode(chunk, chunk, chunk, cache, None, None, None, masked_mean)

    _, start = feed(values[:, :3], cache)
    out, cache = feed(values[:, 3:], start)
    np.testing.assert_array_equal(cache[1], values[:, :5])
    np.testing.assert_allclose(out[:, :2], jnp.cumsum(values[:, :5], 1)[:, 3:5] / jnp.arange(
        4, 6)[None, :, None, None], rtol=1e-6, atol=1e-6)
    assert np.isnan(out[:, 2:]).all()
    # Only real tokens are poisoned: padding past the cache stays finite.
    real_tokens = jnp.asarray([2, 3], jnp.int32)
    out, _ = jax.jit(_kv_cache.decode, static_argnums=(5, 6, 7))(
        values[:, 3:6], values[:, 3:6], values[:, 3:6], start, real_tokens, None, None,
        masked_mean)
    assert np.isfinite(out[0]).all() and np.isnan(out[1, 2:]).all()


def test_decode_errors_name_the_shapes():
    module = _nnx_decoder()
    with pytest.raises(ValueError, match="chunk_lengths"):
        module(_tokens(2), decode=True, chunk_lengths=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="does not fit"):
        module(_tokens(MAX_LENGTH + 1), decode=True)
    with pytest.raises(ValueError, match="key"):
        module(jnp.ones((BATCH + 1, 1, FEATURES)), decode=True)
