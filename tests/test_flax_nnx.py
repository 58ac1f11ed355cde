"""nnx: flash_attention_fn inside nnx.MultiHeadAttention, and FlashMultiHeadAttention, equal
Flax's stock module (same state) in outputs and gradients; float32, odd sizes, GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_flash.flax_modules import FlashMultiHeadAttention, flash_attention_fn  # noqa: E402

TOL = dict(rtol=5e-5, atol=5e-5)
HEADS, QKV_FEATURES, FEATURES, KV_FEATURES = 4, 40, 24, 12  # head_dim 10


def _input(length, features, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((2, length, features)), jnp.float32)


def _pair(num_kv_heads=None, **ours):
    """A stock module and ours with the same parameters."""
    kwargs = dict(num_kv_heads=num_kv_heads, in_kv_features=KV_FEATURES, decode=False)
    stock = nnx.MultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, rngs=nnx.Rngs(0), **kwargs)
    flash = FlashMultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, rngs=nnx.Rngs(1), **kwargs,
                                    **ours)
    nnx.update(flash, nnx.state(stock, nnx.Param))
    return stock, flash


def _outputs_and_grads(module, x_q, x_kv, **call):
    cotangent = _input(x_q.shape[1], FEATURES, seed=9)

    @nnx.jit
    def run(module, x_q, x_kv):
        def loss(module, x_q, x_kv):
            out = module(x_q, x_kv, **call)
            return jnp.sum(out * cotangent), out
        return nnx.grad(loss, argnums=(0, 1, 2), has_aux=True)(module, x_q, x_kv)

    (grad_module, grad_q, grad_kv), out = run(module, x_q, x_kv)
    return out, nnx.state(grad_module, nnx.Param), grad_q, grad_kv


def _outputs(module, *inputs, **call):
    return nnx.jit(lambda module, *inputs: module(*inputs, **call))(module, *inputs)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_attention_fn_in_stock_module_causal(num_kv_heads):
    stock, _ = _pair(num_kv_heads)
    ours = nnx.MultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, num_kv_heads=num_kv_heads,
                                  in_kv_features=KV_FEATURES, decode=False, rngs=nnx.Rngs(0),
                                  attention_fn=flash_attention_fn)
    x_q, x_kv = _input(13, FEATURES, 1), _input(13, KV_FEATURES, 2)
    np.testing.assert_allclose(_outputs(ours, x_q, x_kv, is_causal=True),
                               _outputs(stock, x_q, x_kv, is_causal=True), **TOL)


def test_module_causal_equals_stock_is_causal():
    stock, ours = _pair(2, causal=True)
    x_q, x_kv = _input(13, FEATURES, 3), _input(13, KV_FEATURES, 4)
    assert (jax.tree.structure(nnx.state(ours, nnx.Param))
            == jax.tree.structure(nnx.state(stock, nnx.Param)))
    np.testing.assert_allclose(_outputs(ours, x_q, x_kv),
                               _outputs(stock, x_q, x_kv, is_causal=True), **TOL)


def test_module_gqa_padding_mask_cross_attention_with_grads():
    stock, ours = _pair(2)
    x_q, x_kv = _input(5, FEATURES, 5), _input(11, KV_FEATURES, 6)
    keep = np.random.default_rng(7).random((2, 1, 1, 11)) > 0.3
    keep[..., 0] = True  # no empty rows: Flax averages all values there, jax-flash gives 0
    mask = jnp.asarray(keep)
    got = _outputs_and_grads(ours, x_q, x_kv, mask=mask)
    want = _outputs_and_grads(stock, x_q, x_kv, mask=mask)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), got, want)


def test_module_normalize_qk_equals_stock():
    kwargs = dict(normalize_qk=True, decode=False)
    stock = nnx.MultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, rngs=nnx.Rngs(0), **kwargs)
    ours = FlashMultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, rngs=nnx.Rngs(1), **kwargs)
    params = nnx.state(stock, nnx.Param)
    params["query_ln"]["scale"][...] += _input(1, 10, 8)[0, 0]  # not the all-ones initial scale
    nnx.update(stock, params)
    nnx.update(ours, params)
    x = _input(13, FEATURES, 9)
    np.testing.assert_allclose(_outputs(ours, x, is_causal=True),
                               _outputs(stock, x, is_causal=True), **TOL)


def test_module_errors_name_the_problem():
    ours = FlashMultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features"):
        ours(_input(5, FEATURES + 1, 0))
    with pytest.raises(ValueError, match="init_cache"):
        ours(_input(1, FEATURES, 0), decode=True)
    with pytest.raises(ValueError, match="sow"):
        ours(_input(5, FEATURES, 0), sow_weights=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        FlashMultiHeadAttention(HEADS, FEATURES, QKV_FEATURES, num_kv_heads=3, rngs=nnx.Rngs(0))


def test_module_dropout_uses_the_module_rngs():
    stock, ours = _pair(dropout_rate=0.3, causal=True)
    x_q, x_kv = _input(13, FEATURES, 10), _input(13, KV_FEATURES, 11)
    dropped = nnx.jit(lambda module: module(x_q, x_kv, deterministic=False))
    first, second = dropped(ours), dropped(ours)
    assert not np.allclose(first, second)  # the module's dropout stream advanced
    assert np.isfinite(first).all()
    # deterministic=True turns dropout off: the stock module's causal attention.
    np.testing.assert_allclose(_outputs(ours, x_q, x_kv, deterministic=True),
                               _outputs(stock, x_q, x_kv, is_causal=True), **TOL)


def test_module_segment_ids_equal_the_dense_segment_mask():
    """Causal self-attention over packed rows: segment ids (kv's defaulting to q's) equal the
    module given the mask they mean, on the real rows (padding, id -1, gives 0 from attention
    with ids). Segment ids under decode=True raise."""
    _, ours = _pair(2, causal=True)
    x = _input(9, FEATURES, 12)
    x_kv = _input(9, KV_FEATURES, 13)
    ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, -1], [3, 3, 3, 3, 3, 1, 1, -1, -1]])
    got = _outputs(ours, x, x_kv, q_segment_ids=ids)
    want = _outputs(ours, x, x_kv, mask=ids[:, None, :, None] == ids[:, None, None, :])
    real = np.asarray(ids >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], **TOL)

    ours.init_cache((2, 9, FEATURES))
    with pytest.raises(ValueError, match="kv_segment_ids"):
        ours(x[:, :1], decode=True, kv_segment_ids=ids[:, :1])
