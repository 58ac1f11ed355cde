"""Every feature on a GPU with implementation=None, which takes the XLA path until the kernels
gain the feature (window, window_left, softcap and ALiBi already run on the kernels, mask and
bias on the forward kernel; test_kernel_masks_gpu, test_kernel_alibi_gpu and
test_kernel_bias_mask_gpu test them more thoroughly): forward and gradients of half-precision
inputs against the float32 oracle, held to "no worse than twice the same dense computation in the
inputs' dtype"; GPU only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import TINY, random_normal
from jax_flash._dropout import dense_keep_mask
from test_features_cpu import _case
from test_fwd_gpu import EPSILON, seed  # noqa: F401  seed: a fixture

pytestmark = pytest.mark.gpu

SLACK = 1e-3  # times the largest entry of the oracle's gradient
SHAPE = (2, 200, 333, 8, 2, 64)  # GQA, odd seqlens, several tiles
FEATURES = ["window", "window_left", "softcap", "alibi", "alibi_per_batch", "bias_full",
            "bias_keys", "mask", "mask_keys", "sinks", "everything", "dropout"]


def _options(feature, batch, seqlen_q, seqlen_k, heads):
    """(static options, differentiable tensors, constant tensors, oracle-only options)."""
    if feature == "dropout":
        rng = jax.random.key(11)
        keep = dense_keep_mask(rng, 0.25, batch=batch, heads=heads, seqlen_q=seqlen_q,
                               seqlen_k=seqlen_k)
        return ({"dropout_rate": 0.25}, {}, {"dropout_rng": rng}, {"dropout_keep": keep})
    options, diff, const = _case(feature, 3, (batch, seqlen_q, seqlen_k, heads, 0, 0))
    return options, diff, const, {}


def _vjp(attention, q, k, v, diff, dout, dlse, **options):
    names = sorted(diff)

    def f(q, k, v, *tensors):
        out, lse = attention(q, k, v, **dict(zip(names, tensors)), **options)
        return out.astype(dout.dtype), lse

    (out, lse), vjp = jax.vjp(f, q, k, v, *(diff[n] for n in names))
    return out, lse, vjp((dout, dlse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature", FEATURES)
def test_feature_on_the_xla_path(seed, feature, causal):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = SHAPE
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(key_q, (batch, seqlen_q, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(key_k, (batch, seqlen_k, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(key_v, (batch, seqlen_k, kv_heads, head_dim), jnp.bfloat16)
    options, diff, const, oracle_only = _options(feature, batch, seqlen_q, seqlen_k, heads)
    dout = random_normal(seed + 1, q.shape, jnp.bfloat16)
    dlse = random_normal(seed + 2, (batch, heads, seqlen_q), jnp.float32)

    flash = functools.partial(jax_flash.flash_attention, causal=causal, return_lse=True,
                              **options, **const)
    out, lse, grads = jax.jit(functools.partial(_vjp, flash))(q, k, v, diff, dout, dlse)

    cpu = jax.devices("cpu")[0]
    ref = functools.partial(jax_flash.attention_reference, causal=causal, **options,
                            **{n: x for n, x in const.items() if n != "dropout_rng"},
                            **oracle_only)
    on_cpu = jax.device_put((q, k, v, diff, dout, dlse), cpu)
    dlse_cpu = jnp.where(jnp.isinf(jax.device_put(lse, cpu)), 0, on_cpu[5])
    results = {}
    for name, dtype in (("oracle", jnp.float32), ("dense", jnp.bfloat16)):
        attention = functools.partial(ref, compute_dtype=dtype)
        results[name] = jax.jit(functools.partial(_vjp, attention))(*on_cpu[:5], dlse_cpu)
    (ref_out, ref_lse, ref_grads), (low_out, _, low_grads) = results["oracle"], results["dense"]

    out, ref_out, low_out = (np.asarray(x, np.float32) for x in (out, ref_out, low_out))
    assert not np.isnan(out).any()
    assert np.abs(out - ref_out).max() <= 2 * np.abs(low_out - ref_out).max() + EPSILON
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-3,
                               atol=1e-3)
    for grad, ref, low in zip(grads, ref_grads, low_grads):
        grad, ref, low = (np.asarray(x, np.float32) for x in (grad, ref, low))
        assert not np.isnan(grad).any()
        bound = 2 * np.abs(low - ref).max() + SLACK * np.abs(ref).max() + TINY
        assert np.abs(grad - ref).max() <= bound
