"""Flax masks read for flash_attention: concrete all-true and causal masks take the dedicated
paths, everything else goes to mask=; bad masks and unsupported Flax options raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402

import jax_flash  # noqa: E402
from jax_flash.flax_modules import flash_attention_fn  # noqa: E402
from jax_flash.flax_modules._masks import (  # noqa: E402
    causal_pattern,
    check_broadcasts,
    recognize_mask,
    to_4d,
)


def test_causal_pattern_is_bottom_right_aligned():
    pattern = causal_pattern(3, 5)
    np.testing.assert_array_equal(pattern, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 7), (3, 11), (1, 9)])
def test_concrete_masks_are_recognized(seqlen_q, seqlen_k):
    everything = jnp.ones((2, 1, seqlen_q, seqlen_k), jnp.bool_)
    assert recognize_mask(everything, seqlen_q, seqlen_k) == (None, False)
    causal = jnp.asarray(causal_pattern(seqlen_q, seqlen_k))[None, None]
    mask, is_causal = recognize_mask(causal, seqlen_q, seqlen_k)
    assert mask is None and is_causal == (seqlen_q > 1)  # one query row of causal sees all


def test_other_masks_pass_through():
    top_left = jnp.tril(jnp.ones((3, 11), jnp.bool_))[None, None]  # not our causal: q < k
    assert recognize_mask(top_left, 3, 11)[0] is top_left
    padding = jnp.asarray(np.random.default_rng(0).random((2, 1, 1, 11)) > 0.3)
    assert recognize_mask(padding, 3, 11) == (padding, False)


def test_traced_masks_are_never_read():
    def check(mask):
        out, is_causal = recognize_mask(mask, 5, 5)
        assert out is mask and not is_causal
        return mask

    jax.jit(check)(jnp.ones((1, 1, 5, 5), jnp.bool_))


def test_mask_to_4d_folds_batch_dims_and_keeps_broadcast_ones():
    mask = jnp.asarray(np.random.default_rng(1).random((1, 3, 1, 5, 7)) > 0.5)
    check_broadcasts("mask", mask, (2, 3), 4, 5, 7)
    out = to_4d(mask, (2, 3))
    assert out.shape == (6, 1, 5, 7)
    np.testing.assert_array_equal(out[4], mask[0, 1])  # batch (1, 1) -> row 4 of 6
    assert to_4d(mask[0, 0], (2, 3)).shape == (1, 1, 5, 7)


def _spy_on_flash_attention(monkeypatch):
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return q
    monkeypatch.setattr(jax_flash, "flash_attention", spy)
    return calls


def test_constant_causal_mask_is_recognized_under_jit(monkeypatch):
    """A mask closed over by a jitted function is a constant, read before any jnp op."""
    calls = _spy_on_flash_attention(monkeypatch)
    q = jnp.ones((2, 9, 2, 8))
    mask = nn.make_causal_mask(jnp.ones((2, 9)))  # float32, as Flax makes it
    jax.jit(lambda q: flash_attention_fn(q, q, q, mask=mask))(q)
    jax.jit(lambda q: flash_attention_fn(q, q, q, mask=np.ones((1, 1, 9, 9), bool)))(q)
    jax.jit(lambda q, m: flash_attention_fn(q, q, q, mask=m))(q, mask)  # traced
    assert calls[0]["causal"] and "mask" not in calls[0]
    assert not calls[1]["causal"] and "mask" not in calls[1]
    assert not calls[2]["causal"] and calls[2]["mask"].dtype == jnp.bool_


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (3, 1, 5, 7), (1, 2, 3, 4, 5, 7)])
def test_mask_of_wrong_shape_names_it(shape):
    q = jnp.ones((2, 5, 4, 8))
    k = jnp.ones((2, 7, 4, 8))
    with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast"):
        flash_attention_fn(q, k, k, mask=jnp.ones(shape, jnp.bool_))


def test_unsupported_flax_options_raise():
    q = jnp.ones((1, 5, 2, 8))
    with pytest.raises(ValueError, match="sow"):
        flash_attention_fn(q, q, q, module=object())
    with pytest.raises(ValueError, match="einsum"):
        flash_attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum,
                           attn_weights_value_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="dropout_rng"):
        flash_attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(TypeError, match="mask must be an array"):
        flash_attention_fn(q, q, q, mask=[[True]])
    with pytest.raises(ValueError, match="same batch dims"):
        flash_attention_fn(q, jnp.ones((2, 5, 2, 8)), jnp.ones((2, 5, 2, 8)))


def _flax_reference(q, k, v, mask):
    return nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                    v.astype(jnp.float32), mask=mask)


@pytest.fixture
def qkv():
    rng = np.random.default_rng(2)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((2, 3, 9, 2, 8), (2, 3, 9, 2, 8), (2, 3, 9, 2, 8)))


def test_float_causal_mask_with_extra_batch_dims(qkv):
    """nn.make_causal_mask gives float32 [batch..., 1, q, k]; recognized as causal, here with two
    batch dims."""
    q, k, v = qkv
    mask = nn.make_causal_mask(jnp.ones((2, 3, 9)))
    out = flash_attention_fn(q, k, v, mask=mask)
    np.testing.assert_allclose(out, _flax_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_traced_and_general_masks_match_flax(qkv):
    q, k, v = qkv
    rng = np.random.default_rng(3)
    padding = rng.random((2, 3, 1, 1, 9)) > 0.3
    padding[..., 0] = True  # every query keeps a key: Flax and jax-flash differ on empty rows
    mask = jnp.asarray(padding) & nn.make_causal_mask(jnp.ones((2, 3, 9)), dtype=jnp.bool_)
    want = _flax_reference(q, k, v, mask)
    np.testing.assert_allclose(flash_attention_fn(q, k, v, mask=mask), want, rtol=2e-5,
                               atol=2e-5)
    traced = jax.jit(lambda q, k, v, m: flash_attention_fn(q, k, v, mask=m))(q, k, v, mask)
    np.testing.assert_allclose(traced, want, rtol=2e-5, atol=2e-5)


def test_is_causal_is_top_left_aligned_like_nnx():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(flash_attention_fn(q, k, v, is_causal=True), want, rtol=2e-5,
                               atol=2e-5)
