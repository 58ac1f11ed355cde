"""The Flax modules on the CUDA kernels (bf16), GPU only.

FlashAttention's bar: against Flax's stock module in float32 (same parameters), the jax-flash
module in bfloat16 is at most twice as far off as the stock module in bfloat16, plus EPSILON;
outputs and parameter gradients alike. Decoding (through mask=, which the forward kernel runs)
matches the full run through the kernel within bfloat16 rounding.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jax_flash  # noqa: E402
from jax_flash.flax_modules import FlashMultiHeadAttention, flash_attention_fn  # noqa: E402

pytestmark = pytest.mark.gpu

EPSILON = 1e-3
IMPLEMENTATION = "cuda"  # the kernel, or an error where it cannot run
HEADS, KV_HEADS, FEATURES, HEAD_DIM, SEQLEN = 8, 2, 256, 64, 257


@pytest.fixture(autouse=True)
def require_kernels():
    info = jax_flash.kernel_info()
    if not info["kernels_built"]:
        pytest.fail(f"jax-flash has no CUDA kernels: {info['reason']}")


def _input(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _max_error(got, want):
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _nnx_pair(dtype, implementation=IMPLEMENTATION):
    """Flax's stock module in float32 and `dtype`, and ours in `dtype`, sharing parameters."""
    kwargs = dict(num_kv_heads=KV_HEADS, qkv_features=HEADS * HEAD_DIM, decode=False)
    stock32 = nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **kwargs)
    stock_low = nnx.MultiHeadAttention(HEADS, FEATURES, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
    ours = FlashMultiHeadAttention(HEADS, FEATURES, dtype=dtype, causal=True,
                                   implementation=implementation, rngs=nnx.Rngs(0), **kwargs)
    for module in (stock_low, ours):
        nnx.update(module, nnx.state(stock32, nnx.Param))
    return stock32, stock_low, ours


def _outputs_and_param_grads(module, x, cotangent, **call):
    @nnx.jit
    def run(module, x):
        def loss(module):
            out = module(x, **call).astype(jnp.float32)
            return jnp.sum(out * cotangent), out
        grads, out = nnx.grad(loss, has_aux=True)(module)
        return out, nnx.state(grads, nnx.Param)
    return run(module, x)


def test_nnx_module_bf16_kernel_meets_the_bar():
    stock32, stock_low, ours = _nnx_pair(jnp.bfloat16)
    x = _input((2, SEQLEN, FEATURES), 1)
    cotangent = _input((2, SEQLEN, FEATURES), 2)
    want = _outputs_and_param_grads(stock32, x, cotangent, is_causal=True)
    baseline = _outputs_and_param_grads(stock_low, x, cotangent, is_causal=True)
    got = _outputs_and_param_grads(ours, x, cotangent)
    for index, name in enumerate(("output", "parameter gradients")):
        error, bar = _max_error(got[index], want[index]), _max_error(baseline[index],
                                                                      want[index])
        assert error <= 2 * bar + EPSILON, f"{name}: error {error} vs stock bf16 {bar}"


def test_linen_attention_fn_bf16_kernel_meets_the_bar():
    attention_fn = functools.partial(flash_attention_fn, causal=True,
                                     implementation=IMPLEMENTATION)

    def module(attention_fn=nn.dot_product_attention, dtype=jnp.float32):
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, dtype=dtype,
                                               attention_fn=attention_fn)

    x = _input((2, SEQLEN, FEATURES), 3)
    params = module().init(jax.random.key(0), x)
    mask = nn.make_causal_mask(jnp.ones((2, SEQLEN)))
    want = jax.jit(lambda p, x: module().apply(p, x, mask=mask))(params, x)
    baseline = jax.jit(lambda p, x: module(dtype=jnp.bfloat16).apply(p, x, mask=mask))(params, x)
    got = jax.jit(lambda p, x: module(attention_fn, jnp.bfloat16).apply(p, x))(params, x)
    error, bar = _max_error(got, want), _max_error(baseline, want)
    assert error <= 2 * bar + EPSILON, f"error {error} vs stock bf16 {bar}"


def test_nnx_decode_bf16_matches_the_full_run():
    *_, ours = _nnx_pair(jnp.bfloat16, implementation=None)  # decoding needs mask=
    x = _input((2, 64, FEATURES), 4)
    full = nnx.jit(lambda module, x: module(x))(ours, x)
    ours.init_cache((2, 64, FEATURES), jnp.bfloat16)
    step = nnx.jit(lambda module, chunk: module(chunk, decode=True))
    outputs = [step(ours, x[:, :40])] + [step(ours, x[:, i:i + 1]) for i in range(40, 64)]
    decoded = jnp.concatenate(outputs, axis=1)
    np.testing.assert_allclose(np.asarray(decoded, np.float32), np.asarray(full, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_train_gpt_tiny_learns_on_the_gpu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent.parent / "examples"))
    import train_gpt

    train_gpt.main(["--tiny", "--steps", "60", "--log-every", "20", "--generate", "8"])
    text = capsys.readouterr().out
    assert "gpu:" in text and "bfloat16" in text, text
    losses = [float(loss) for loss in re.findall(r"step \d+/60 loss ([0-9.]+)", text)]
    assert losses[-1] < losses[0] - 0.5, losses
