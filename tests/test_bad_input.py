"""Every bad input fails at trace time with an error that names the argument."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash

B, S, H, D = 2, 17, 4, 40


def _trace(q_shape, k_shape=None, v_shape=None, *, dtypes=(jnp.float32,) * 3, **options):
    """Traces flash_attention on abstract inputs: nothing runs, so errors are trace-time."""
    k_shape = q_shape if k_shape is None else k_shape
    v_shape = k_shape if v_shape is None else v_shape
    args = [jax.ShapeDtypeStruct(shape, dtype)
            for shape, dtype in zip((q_shape, k_shape, v_shape), dtypes)]
    return jax.eval_shape(functools.partial(jax_flash.flash_attention, **options), *args)


@pytest.mark.parametrize("shapes,match", [
    (((S, H, D), (B, S, H, D)), r"q must be 4-D .*got q \(17, 4, 40\), k \(2, 17, 4, 40\)"),
    (((B, S, H, D), (1, B, S, H, D)), r"k must be 4-D .*k \(1, 2, 17, 4, 40\)"),
    (((B, S, H, D), (B, S, H, D), (B, S, H * D)), r"v must be 4-D"),
])
def test_rank(shapes, match):
    with pytest.raises(ValueError, match=match):
        _trace(*shapes)


@pytest.mark.parametrize("shapes,match", [
    (((B, S, H, D), (B + 1, S, H, D)), r"same batch .*q \(2, 17, 4, 40\), k \(3, 17, 4, 40\)"),
    (((B, S, H, D), (B, S, 3, D)), r"heads of k and v .*must divide the heads of q.*k \(2, 17, 3, 40\)"),
    (((B, S, H, D), (B, S, H, 64)), r"same head_dim .*k \(2, 17, 4, 64\)"),
    (((B, S, H, D), (B, 9, H, D), (B, 10, H, D)), r"k and v must have the same seqlen .*v \(2, 10"),
])
def test_shape_mismatch(shapes, match):
    with pytest.raises(ValueError, match=match):
        _trace(*shapes)


@pytest.mark.parametrize("shapes,match", [
    (((0, S, H, D), (0, S, H, D)), r"q has an empty batch dimension"),
    (((B, 0, H, D), (B, S, H, D)), r"q has an empty seqlen dimension"),
    (((B, S, H, D), (B, 0, H, D)), r"k has an empty seqlen dimension"),
    (((B, S, 0, D), (B, S, 0, D)), r"q has an empty heads dimension"),
    (((B, S, H, 0), (B, S, H, 0)), r"q has an empty head_dim dimension"),
])
def test_empty_dimension(shapes, match):
    with pytest.raises(ValueError, match=match):
        _trace(*shapes)


@pytest.mark.parametrize("implementation", [None, "cuda", "xla"])
def test_head_dim_above_256(implementation):
    with pytest.raises(ValueError, match=r"head_dim 288 of q is larger than 256"):
        _trace((B, S, H, 288), dtypes=(jnp.bfloat16,) * 3, implementation=implementation)


@pytest.mark.parametrize("dtypes,match", [
    ((jnp.int32,) * 3, r"q has dtype int32"),
    ((jnp.float32, jnp.bool_, jnp.float32), r"k has dtype bool"),
    ((jnp.float32, jnp.float32, jnp.float8_e4m3fn), r"v has dtype float8_e4m3fn"),
    ((jnp.float32, jnp.bfloat16, jnp.float32), r"same dtype; got q float32, k bfloat16, v float32"),
])
def test_dtype(dtypes, match):
    with pytest.raises(TypeError, match=match):
        _trace((B, S, H, D), dtypes=dtypes)


def test_cuda_implementation_needs_half_precision():
    with pytest.raises(TypeError, match=r"implementation='cuda' needs .*got float32"):
        _trace((B, S, H, D), implementation="cuda")


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf"), np.float32("-inf")])
def test_softmax_scale_value(scale):
    with pytest.raises(ValueError, match=r"softmax_scale must be positive and finite"):
        _trace((B, S, H, D), softmax_scale=scale)


@pytest.mark.parametrize("scale", ["0.1", True, jnp.ones(())])
def test_softmax_scale_type(scale):
    with pytest.raises(TypeError, match=r"softmax_scale must be a static .*real number"):
        _trace((B, S, H, D), softmax_scale=scale)


@pytest.mark.parametrize("implementation", ["triton", "CUDA", "", 0])
def test_implementation(implementation):
    with pytest.raises(ValueError, match=r"implementation must be one of \(None, 'cuda', 'xla'\)"):
        _trace((B, S, H, D), implementation=implementation)


@pytest.mark.parametrize("flag", ["causal", "return_lse", "deterministic"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=rf"{flag} must be a Python bool; got str"):
        _trace((B, S, H, D), **{flag: "yes"})


def test_inputs_must_be_arrays():
    q = np.ones((B, S, H, D), np.float32)
    with pytest.raises(TypeError, match=r"k must be an array; got list"):
        jax_flash.flash_attention(q, q.tolist(), q)


def test_errors_come_before_anything_runs():
    """Under jit the check fires while tracing, with the caller's shapes in the message."""
    q = jnp.ones((B, S, H, D), jnp.float32)
    k = jnp.ones((B, S, H, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"same head_dim"):
        jax.jit(jax_flash.flash_attention).trace(q, k, k)
