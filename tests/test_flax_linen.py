"""linen: flash_attention_fn inside Flax's MultiHeadDotProductAttention, and
FlashMultiHeadDotProductAttention, equal Flax's stock module (same params) in outputs and
gradients; float32, odd sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402

from jax_flash.flax_modules import (  # noqa: E402
    FlashMultiHeadDotProductAttention,
    flash_attention_fn,
)

TOL = dict(rtol=5e-5, atol=5e-5)
HEADS, QKV_FEATURES, FEATURES = 4, 40, 24  # head_dim 10


def _inputs(seqlen_q=13, seqlen_k=13, seed=0):
    rng = np.random.default_rng(seed)
    x_q = jnp.asarray(rng.standard_normal((2, seqlen_q, FEATURES)), jnp.float32)
    x_k = jnp.asarray(rng.standard_normal((2, seqlen_k, FEATURES)), jnp.float32)
    return x_q, x_k


def _padding_mask(seqlen_q, seqlen_k, seed=1):
    keep = np.random.default_rng(seed).random((2, 1, 1, seqlen_k)) > 0.3
    keep[..., 0] = True  # no empty rows: Flax averages all values there, jax-flash gives 0
    return jnp.asarray(np.broadcast_to(keep, (2, 1, seqlen_q, seqlen_k)))


def _assert_trees_close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), got, want)


def _outputs_and_grads(module, params, x_q, x_k, grads=True, **call):
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal((2, x_q.shape[1],
                                                                      FEATURES)), jnp.float32)

    def loss(params, x_q, x_k):
        out = module.apply(params, x_q, x_k, **call)
        return jnp.sum(out * cotangent), out

    # call (the mask) is closed over: a constant under jit, so a concrete mask stays readable
    if not grads:  # compiling the backward is most of these tests' time on 2 cores
        return jax.jit(lambda *args: loss(*args)[1])(params, x_q, x_k)
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x_q, x_k)
    return out, grads


def _stock(**fields):
    return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES, **fields)


def _check_same(ours, params, seqlen_q, seqlen_k, stock_mask, grads=True, **our_call):
    x_q, x_k = _inputs(seqlen_q, seqlen_k)
    got = _outputs_and_grads(ours, params, x_q, x_k, grads, **our_call)
    want = _outputs_and_grads(_stock(), params, x_q, x_k, grads, mask=stock_mask)
    _assert_trees_close(got, want)


def test_attention_fn_in_stock_module_causal_mask():
    x_q, _ = _inputs()
    params = _stock().init(jax.random.key(0), x_q)
    mask = nn.make_causal_mask(jnp.ones((2, 13)))  # concrete: recognized as causal
    _check_same(_stock(attention_fn=flash_attention_fn), params, 13, 13, mask, grads=False,
                mask=mask)


def test_attention_fn_padding_mask_cross_attention_with_grads():
    x_q, x_k = _inputs(5, 11)
    params = _stock().init(jax.random.key(0), x_q, x_k)
    mask = _padding_mask(5, 11)
    _check_same(_stock(attention_fn=flash_attention_fn), params, 5, 11, mask, mask=mask)


def test_attention_fn_traced_causal_mask_under_jit():
    x_q, _ = _inputs()
    params = _stock().init(jax.random.key(0), x_q)
    ours = _stock(attention_fn=flash_attention_fn)

    @jax.jit
    def run(params, x):
        return ours.apply(params, x, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))

    want = _stock().apply(params, x_q, mask=nn.make_causal_mask(jnp.ones((2, 13))))
    np.testing.assert_allclose(run(params, x_q), want, **TOL)


def test_module_causal_equals_stock_with_causal_mask():
    x_q, _ = _inputs()
    stock = _stock(normalize_qk=True)
    params = stock.init(jax.random.key(0), x_q)
    ours = FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES,
                                             normalize_qk=True, causal=True)
    assert jax.tree.structure(ours.init(jax.random.key(0), x_q)) == jax.tree.structure(params)
    x_q, _ = _inputs(seed=5)
    got = _outputs_and_grads(ours, params, x_q, x_q, grads=False)
    want = _outputs_and_grads(stock, params, x_q, x_q, grads=False,
                              mask=nn.make_causal_mask(jnp.ones((2, 13))))
    np.testing.assert_allclose(got, want, **TOL)


def test_module_gqa_equals_stock_with_repeated_kv_heads():
    """Query head i uses kv head i // group: the stock module with each kv projection repeated
    group times computes the same function."""
    x_q, _ = _inputs()
    ours = FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES,
                                             num_kv_heads=2, causal=True)
    params = ours.init(jax.random.key(3), x_q)
    assert params["params"]["key"]["kernel"].shape == (FEATURES, 2, QKV_FEATURES // HEADS)
    repeated = jax.tree.map(lambda x: x, params)
    for name in ("key", "value"):
        for leaf, axis in (("kernel", 1), ("bias", 0)):
            repeated["params"][name][leaf] = jnp.repeat(params["params"][name][leaf], 2, axis)
    x_q, _ = _inputs(seed=4)
    got = ours.apply(params, x_q)
    want = _stock().apply(repeated, x_q, mask=nn.make_causal_mask(jnp.ones((2, 13))))
    np.testing.assert_allclose(got, want, **TOL)


def test_module_rejects_bad_head_counts_and_sow_weights():
    x_q, _ = _inputs()
    with pytest.raises(ValueError, match="num_kv_heads"):
        FlashMultiHeadDotProductAttention(num_heads=4, qkv_features=40, num_kv_heads=3).init(
            jax.random.key(0), x_q)
    ours = FlashMultiHeadDotProductAttention(num_heads=4, qkv_features=40)
    params = ours.init(jax.random.key(0), x_q)
    with pytest.raises(ValueError, match="sow"):
        ours.apply(params, x_q, sow_weights=True)


def test_module_dropout_is_random_and_off_when_deterministic():
    x_q, _ = _inputs()
    ours = FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES,
                                             dropout_rate=0.3, causal=True)
    params = ours.init(jax.random.key(0), x_q, deterministic=True)

    def run(seed, deterministic):
        return ours.apply(params, x_q, deterministic=deterministic,
                          rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(run(1, False), run(1, False))
    assert not np.allclose(run(1, False), run(2, False))
    want = _stock().apply(params, x_q, mask=nn.make_causal_mask(jnp.ones((2, 13))))
    np.testing.assert_allclose(run(1, True), want, **TOL)


def test_module_segment_ids_equal_the_dense_segment_mask():
    """Cross-attention with q and kv segment ids equals the module given the mask they mean;
    padded queries (id -1) give 0 from attention with ids, so only real rows are compared. Segment
    ids under decode=True raise."""
    x_q, x_k = _inputs(7, 11, seed=6)
    q_ids = jnp.asarray([[0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 0, 0, 0]])
    kv_ids = jnp.asarray([[1, 0, 0, -1, 1, 1, 0, 0, 1, -1, -1], [0, 2, 2, 0, 2, 2, 0, 0, 2, 2, 2]])
    ours = FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES)
    params = ours.init(jax.random.key(2), x_q, x_k)
    got = ours.apply(params, x_q, x_k, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    mask = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
    want = ours.apply(params, x_q, x_k, mask=mask)
    real = np.asarray(q_ids >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], **TOL)

    decoding = FlashMultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV_FEATURES,
                                                 decode=True)
    with pytest.raises(ValueError, match="q_segment_ids"):
        decoding.init(jax.random.key(2), x_q, q_segment_ids=q_ids)
