"""The attention features on the XLA path (window_size, softcap, alibi_slopes, mask, bias, sinks),
forward and every gradient, against the dense float32 oracle extended with each feature; each
combined with causal, grouped-query attention and odd seqlens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flash
from grad_oracle import random_normal

# float32 against the float32 oracle: only the order of the sums differs.
ATOL = RTOL = 2e-5

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim): odd seqlens both ways, GQA and MHA.
GQA = (2, 13, 23, 4, 2, 8)
MHA = (1, 23, 13, 3, 3, 8)


def make_inputs(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype=jnp.float32):
    q = random_normal(seed, (batch, seqlen_q, heads, head_dim), dtype)
    k = random_normal(seed + 1, (batch, seqlen_k, kv_heads, head_dim), dtype)
    v = random_normal(seed + 2, (batch, seqlen_k, kv_heads, head_dim), dtype)
    return q, k, v


def feature_tensors(name, seed, batch, seqlen_q, seqlen_k, heads):
    """(differentiable tensors, constant tensors) for one named feature case."""
    rng = np.random.default_rng(seed)
    if name == "alibi":
        return {"alibi_slopes": jnp.asarray(rng.uniform(0.05, 0.5, heads), jnp.float32)}, {}
    if name == "alibi_per_batch":
        slopes = rng.uniform(0.05, 0.5, (batch, heads))
        return {"alibi_slopes": jnp.asarray(slopes, jnp.float32)}, {}
    if name == "bias_full":
        return {"bias": random_normal(seed, (batch, heads, seqlen_q, seqlen_k), jnp.float32)}, {}
    if name == "bias_keys":  # one bias per key, broadcast over batch, heads and queries
        return {"bias": random_normal(seed, (seqlen_k,), jnp.float32)}, {}
    if name == "bias_heads_queries":
        return {"bias": random_normal(seed, (heads, seqlen_q, 1), jnp.float32)}, {}
    if name == "mask":
        return {}, {"mask": jnp.asarray(rng.random((batch, 1, seqlen_q, seqlen_k)) < 0.7)}
    if name == "mask_keys":
        return {}, {"mask": jnp.asarray(rng.random((1, heads, 1, seqlen_k)) < 0.6)}
    if name == "sinks":
        return {"sinks": random_normal(seed, (heads,), jnp.float32)}, {}
    return {}, {}


# name -> (static options, tensor feature case)
FEATURES = {
    "window": ({"window_size": (4, 2)}, None),
    "window_left": ({"window_size": (5, -1)}, None),
    "window_right": ({"window_size": (-1, 3)}, None),
    "softcap": ({"softcap": 1.5}, None),
    "alibi": ({}, "alibi"),
    "alibi_per_batch": ({}, "alibi_per_batch"),
    "bias_full": ({}, "bias_full"),
    "bias_keys": ({}, "bias_keys"),
    "bias_heads_queries": ({}, "bias_heads_queries"),
    "mask": ({}, "mask"),
    "mask_keys": ({}, "mask_keys"),
    "sinks": ({}, "sinks"),
    "everything": ({"window_size": (6, 3), "softcap": 2.0}, "everything"),
}


def _case(feature, seed, shape):
    batch, seqlen_q, seqlen_k, heads, _, _ = shape
    options, tensors = FEATURES[feature]
    names = ["alibi", "bias_heads_queries", "mask", "sinks"] if tensors == "everything" else (
        [tensors] if tensors else [])
    diff, const = {}, {}
    for i, name in enumerate(names):
        d, c = feature_tensors(name, seed + 10 * i, batch, seqlen_q, seqlen_k, heads)
        diff.update(d)
        const.update(c)
    return options, diff, const


def grads_and_oracle(q, k, v, diff, *, seed=7, **options):
    """((out, lse), grads) of flash_attention and of the oracle, for random cotangents of out and
    lse; grads cover q, k, v and every differentiable feature tensor in `diff`."""
    names = sorted(diff)

    batch, seqlen_q, heads, _ = q.shape
    dout = random_normal(seed, q.shape, jnp.float32)
    dlse = random_normal(seed + 1, (batch, heads, seqlen_q), jnp.float32)

    # One compilation for the forward and the backward.
    @functools.partial(jax.jit, static_argnums=0)
    def run(attention, *inputs):
        def f(q, k, v, *tensors):
            return attention(q, k, v, **dict(zip(names, tensors)), **options)

        (out, lse), vjp = jax.vjp(f, *inputs)
        # lse is -inf on rows that see nothing, where the dense oracle's derivative is NaN.
        return (out, lse), vjp((dout.astype(out.dtype), jnp.where(jnp.isinf(lse), 0, dlse)))

    flash = functools.partial(jax_flash.flash_attention, return_lse=True)
    inputs = (q, k, v, *(diff[n] for n in names))
    return (run(flash, *inputs), run(jax_flash.attention_reference, *inputs),
            ["dq", "dk", "dv", *names])


def assert_matches_oracle(q, k, v, diff, atol=ATOL, rtol=RTOL, **options):
    ((out, lse), grads), ((ref_out, ref_lse), ref_grads), names = grads_and_oracle(
        q, k, v, diff, **options)
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=rtol, err_msg="out")
    np.testing.assert_allclose(lse, ref_lse, atol=atol, rtol=rtol, err_msg="lse")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad.shape == ref.shape, name
        assert not np.isnan(grad).any(), f"NaN in {name}"
        np.testing.assert_allclose(grad, ref, atol=atol * max(1, np.abs(ref).max()), rtol=rtol,
                                   err_msg=name)


# (feature, causal, shape): every feature once, alternating causal and the two shapes; compiling
# each combination costs seconds, so the grid is not a full product.
CASES = [
    ("window", False, GQA), ("window_left", True, MHA), ("window_right", False, MHA),
    ("softcap", True, GQA), ("alibi", False, MHA), ("alibi_per_batch", True, GQA),
    ("bias_full", False, GQA), ("bias_keys", True, MHA), ("bias_heads_queries", True, GQA),
    ("mask", True, MHA), ("mask_keys", False, GQA), ("sinks", True, GQA),
    ("everything", True, GQA), ("everything", False, MHA),
]


@pytest.mark.parametrize("feature,causal,shape", CASES,
                         ids=[f"{f}-{'causal' if c else 'full'}-{'gqa' if s == GQA else 'mha'}"
                              for f, c, s in CASES])
def test_matches_oracle(feature, causal, shape):
    q, k, v = make_inputs(0, *shape)
    options, diff, const = _case(feature, 3, shape)
    assert_matches_oracle(q, k, v, diff, causal=causal, **options, **const)


@pytest.mark.parametrize("feature", ["window", "everything"])
def test_check_grads(feature):
    """Numerical against automatic derivatives of flash_attention itself, every input at once."""
    shape = (1, 9, 11, 4, 2, 8)
    q, k, v = make_inputs(1, *shape)
    options, diff, const = _case(feature, 5, shape)
    names = sorted(diff)

    @jax.jit
    def f(q, k, v, *tensors):
        out, lse = jax_flash.flash_attention(q, k, v, causal=True, return_lse=True,
                                             **dict(zip(names, tensors)), **options, **const)
        return out, jnp.where(jnp.isinf(lse), 0, lse)

    check_grads(f, (q, k, v, *(diff[n] for n in names)), order=1, modes=("rev",), eps=1e-2,
                atol=1e-2, rtol=1e-2)


def test_window_tiles_are_skipped_and_results_do_not_depend_on_tiles():
    """A narrow window over many tiles: the blockwise loops branch around hidden tiles, and any
    tile size gives the oracle's answer."""
    from jax_flash._blockwise import blockwise_attention

    q, k, v = make_inputs(2, 1, 70, 90, 2, 1, 8)
    options = dict(causal=True, softmax_scale=0.3, window_size=(9, 0))
    ref_out, ref_lse = jax.jit(functools.partial(jax_flash.attention_reference, **options))(
        q, k, v)
    attention = functools.partial(blockwise_attention, block_q=16, block_k=8, **options)
    out, lse = jax.jit(attention)(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse, ref_lse, atol=ATOL, rtol=RTOL)
    assert "cond" in str(jax.make_jaxpr(attention)(q, k, v))


@pytest.mark.parametrize("options", [
    {"mask": np.zeros((1, 1, 5, 1), bool).repeat(9, axis=3)},
    {"window_size": (0, 0), "causal": True},  # sq > sk: the first rows see no key
])
def test_rows_that_see_nothing(options):
    """out 0 and lse -inf, gradients finite; with sinks lse is the sink and out is still 0."""
    q, k, v = make_inputs(3, 2, 5, 3 if "window_size" in options else 9, 2, 1, 8)
    if "mask" in options:
        mask = options["mask"].copy()
        mask[..., 3:, :] = True  # rows 0-2 see nothing, 3-4 everything
        options = {"mask": jnp.asarray(mask)}
    sinks = random_normal(4, (2,), jnp.float32)

    @jax.jit
    def run(q, k, v, sinks):
        def loss(q, k, v, sinks):
            out, lse = jax_flash.flash_attention(q, k, v, return_lse=True, sinks=sinks, **options)
            return jnp.sum(out ** 2) + jnp.sum(lse), (out, lse)

        plain = jax_flash.flash_attention(q, k, v, return_lse=True, **options)
        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks), plain

    (grads, (out, lse)), (out_plain, lse_plain) = run(q, k, v, sinks)
    empty = np.isneginf(np.asarray(lse_plain))  # [b, h, sq]
    assert empty.any() and not empty.all()
    np.testing.assert_array_equal(np.asarray(out_plain).transpose(0, 2, 1, 3)[empty], 0)
    np.testing.assert_array_equal(np.asarray(out).transpose(0, 2, 1, 3)[empty], 0)
    sink_per_row = np.broadcast_to(np.asarray(sinks)[None, :, None], empty.shape)
    np.testing.assert_allclose(np.asarray(lse)[empty], sink_per_row[empty])
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()


def test_bias_gradient_keeps_the_bias_dtype_and_shape():
    q, k, v = make_inputs(5, 2, 13, 11, 2, 2, 8)
    bias = random_normal(6, (1, 13, 1), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda b: jnp.sum(jax_flash.flash_attention(q, k, v, bias=b))))(bias)
    assert grad.shape == bias.shape and grad.dtype == jnp.bfloat16


@pytest.mark.parametrize("options,match", [
    ({"window_size": (2,)}, "window_size must be a pair"),
    ({"window_size": (-2, 0)}, "window_size entries must be >= 0"),
    ({"softcap": -1.0}, "softcap must be finite and >= 0"),
    ({"softcap": jnp.float32(1)}, "softcap must be a static"),
    ({"alibi_slopes": jnp.ones((3,))}, r"alibi_slopes must be a float array \[heads\] = \[4\]"),
    ({"mask": jnp.ones((13, 12), bool)}, r"mask of shape \[13, 12\] does not broadcast"),
    ({"mask": jnp.ones((13, 11))}, "mask must be boolean"),
    ({"bias": jnp.ones((3, 1, 1))}, r"bias of shape \[3, 1, 1\] does not broadcast"),
    ({"bias": jnp.ones((11,), bool)}, "bias must be floating-point"),
    ({"sinks": jnp.ones((2,))}, r"sinks must be a float array \[heads\] = \[4\]"),
])
def test_bad_feature_arguments(options, match):
    q, k, v = make_inputs(0, 2, 13, 11, 4, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        jax_flash.flash_attention(q, k, v, **options)


@pytest.mark.parametrize("options,named", [
    # windows, ALiBi, softcap, mask, bias and dropout run on the kernels; bias with softcap
    # does not
    ({"window_size": (3, 0), "alibi_slopes": jnp.ones((4,)), "mask": jnp.ones((11,), bool),
      "dropout_rate": 0.1, "dropout_rng": jax.random.key(0), "softcap": 5.0,
      "bias": jnp.ones((11,), jnp.bfloat16)}, "bias with softcap: "),
])
def test_cuda_implementation_names_the_features_the_kernel_lacks(options, named):
    q, k, v = make_inputs(0, 2, 13, 11, 4, 2, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"implementation='cuda' cannot run {named}"):
        jax_flash.flash_attention(q, k, v, implementation="cuda", **options)
