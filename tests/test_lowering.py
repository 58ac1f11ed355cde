"""The CUDA lowering, read as StableHLO text after lowering for 'cuda' (no GPU needed)."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jax_flash
from jax_flash import _extension, _kernel_choice

needs_kernels = pytest.mark.skipif(
    not _extension.kernels_built(),
    reason=f"jax-flash has no CUDA kernels here: {_extension.why_no_kernels()}")


def _lower_for_cuda(q_shape, kv_shape, dtype=jnp.bfloat16, **options) -> str:
    q = jax.ShapeDtypeStruct(q_shape, dtype)
    kv = jax.ShapeDtypeStruct(kv_shape, dtype)
    attention = jax.jit(functools.partial(jax_flash.flash_attention, return_lse=True, **options))
    return attention.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()


def _kernel_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "custom_call @jax_flash_fwd(" in line]


def _float_attribute(call: str, name: str) -> float:
    return float(re.search(rf"{name} = ([-+.\w]+) : f32", call).group(1))


def _operand_types(call: str) -> list[str]:
    """The operand tensor types of a custom_call line: `(tensor<...>, ...) -> (...)`."""
    operands = call.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
    return operands.split(", ")


# ---- with the installed extension ------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_call_carries_attributes(dtype, causal):
    head_dim = max(_extension.kernel_head_dims())
    hlo = _lower_for_cuda((2, 17, 4, head_dim), (2, 23, 4, head_dim), dtype, causal=causal,
                          softmax_scale=0.25)
    (call,) = _kernel_calls(hlo)
    assert _float_attribute(call, "softmax_scale") == 0.25
    assert f"causal = {str(causal).lower()}" in call
    dtype_name = jnp.dtype(dtype).name.replace("float", "f")  # bf16, f16
    assert _operand_types(call) == [
        f"tensor<2x17x4x{head_dim}x{dtype_name}>",
        f"tensor<2x23x4x{head_dim}x{dtype_name}>",
        f"tensor<2x23x4x{head_dim}x{dtype_name}>",
    ]


@needs_kernels
def test_head_dim_40_is_padded_for_the_kernel():
    padded = min(d for d in _extension.kernel_head_dims() if d >= 40)
    hlo = _lower_for_cuda((2, 17, 4, 40), (2, 17, 4, 40))
    (call,) = _kernel_calls(hlo)
    assert _operand_types(call) == [f"tensor<2x17x4x{padded}xbf16>"] * 3
    # The scale comes from the original head_dim, not the padded one.
    assert _float_attribute(call, "softmax_scale") == pytest.approx(40 ** -0.5, rel=1e-6)


@needs_kernels
def test_xla_implementation_never_calls_the_kernel():
    assert not _kernel_calls(_lower_for_cuda((2, 17, 4, 64), (2, 17, 4, 64),
                                             implementation="xla"))


@needs_kernels
def test_float32_takes_the_xla_path_by_default():
    assert not _kernel_calls(_lower_for_cuda((2, 17, 4, 64), (2, 17, 4, 64), jnp.float32))


# ---- dispatch and padding, with the build's answers stood in for -------------------------------
# These run everywhere: a lowering needs the FFI target's name, not its code.

@pytest.fixture
def pretend_build(monkeypatch):
    """Makes jax-flash believe it was built as given; warnings start unsaid."""

    def pretend(kernels=True, head_dims=(32, 64, 96, 128, 160, 192, 224, 256), capability=None):
        reason = "" if kernels else "the kernels were left out of this pretend build"
        build = _extension.BuildInfo(kernels, reason, ("80", "90a") if kernels else (),
                                     head_dims if kernels else ())
        monkeypatch.setattr(_extension, "BUILD", build)
        monkeypatch.setattr(_extension, "_warned_reasons", set())
        monkeypatch.setattr(_kernel_choice, "_min_compute_capability", lambda: capability)

    return pretend


@pytest.mark.parametrize("head_dim,padded", [(40, 64), (64, 64), (100, 128), (17, 64)])
def test_pads_to_the_smallest_compiled_head_dim(pretend_build, head_dim, padded):
    pretend_build(head_dims=(64, 128))
    hlo = _lower_for_cuda((1, 9, 2, head_dim), (1, 11, 2, head_dim), causal=True)
    (call,) = _kernel_calls(hlo)
    assert _operand_types(call) == [f"tensor<1x9x2x{padded}xbf16>"] + [
        f"tensor<1x11x2x{padded}xbf16>"] * 2
    assert "causal = true" in call
    assert _float_attribute(call, "softmax_scale") == pytest.approx(head_dim ** -0.5, rel=1e-6)
    # out is sliced back and lse passes through: the function returns the caller's head_dim.
    assert re.search(rf"-> \(tensor<1x9x2x{head_dim}xbf16>.*, tensor<1x2x9xf32>", hlo)



def test_value_head_dim_pads_to_one_kernel_head_dim(pretend_build):
    """q/k 192 with v 128 call the d192 kernel with v zero-padded, and return v's 128 columns."""
    pretend_build(head_dims=(128, 192))
    q = jax.ShapeDtypeStruct((1, 9, 2, 192), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 11, 2, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 11, 2, 128), jnp.bfloat16)
    hlo = jax.jit(jax_flash.flash_attention).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    (call,) = _kernel_calls(hlo)
    assert _operand_types(call) == ["tensor<1x9x2x192xbf16>"] + ["tensor<1x11x2x192xbf16>"] * 2
    (main,) = [line for line in hlo.splitlines() if "func.func public @main" in line]
    assert main.endswith("-> (tensor<1x9x2x128xbf16> {jax.result_info = \"result\"}) {"), main

# Builds and GPUs the kernel cannot serve, with the reason each one's message gives.
KERNEL_CANNOT_RUN = [
    (dict(kernels=False), "left out of this pretend build"),
    (dict(capability=(7, 5)), "compute capability 7.5"),
    (dict(head_dims=(64,)), "head_dim 100 is larger than every head dim"),
]


@pytest.mark.parametrize("setup,reason", KERNEL_CANNOT_RUN)
def test_auto_falls_back_and_warns_once(pretend_build, setup, reason):
    pretend_build(**setup)
    with pytest.warns(RuntimeWarning, match=reason):
        hlo = _lower_for_cuda((1, 9, 2, 100), (1, 9, 2, 100))
    assert not _kernel_calls(hlo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lower_for_cuda((1, 5, 2, 100), (1, 5, 2, 100))


@pytest.mark.parametrize("setup,reason", KERNEL_CANNOT_RUN)
def test_cuda_implementation_refuses_what_the_kernel_cannot_run(pretend_build, setup, reason):
    pretend_build(**setup)
    with pytest.raises(RuntimeError, match=f"implementation='cuda' cannot run: .*{reason}"):
        _lower_for_cuda((1, 9, 2, 100), (1, 9, 2, 100), implementation="cuda")


def test_cpu_lowering_never_calls_the_kernel(pretend_build):
    pretend_build()
    q = jax.ShapeDtypeStruct((1, 9, 2, 64), jnp.bfloat16)
    hlo = jax.jit(jax_flash.flash_attention).trace(q, q, q).lower(
        lowering_platforms=("cpu",)).as_text()
    assert not _kernel_calls(hlo)


# ---- the backward --------------------------------------------------------------------------------

def _lower_grad_for_cuda(shape, dtype=jnp.bfloat16, **options) -> str:
    x = jax.ShapeDtypeStruct(shape, dtype)
    loss = lambda q, k, v: jnp.sum(
        jax_flash.flash_attention(q, k, v, **options).astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()


def _backward_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "custom_call @jax_flash_bwd(" in line]


@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_calls_the_backward_kernel(pretend_build, deterministic):
    pretend_build(head_dims=(64, 128))
    hlo = _lower_grad_for_cuda((1, 33, 2, 40), causal=True, deterministic=deterministic)
    (call,) = _backward_calls(hlo)
    assert f"deterministic = {str(deterministic).lower()}" in call
    assert "causal = true" in call
    assert _float_attribute(call, "softmax_scale") == pytest.approx(40 ** -0.5, rel=1e-6)
    # q, k, v, dout padded to 64; lse and delta [b, h, sq] in float32.
    assert _operand_types(call) == ["tensor<1x33x2x64xbf16>"] * 4 + ["tensor<1x2x33xf32>"] * 2
    # dq, dk and dv (per query head), dq_accum in float32 with rows rounded up to 128, 3
    # semaphore counters for 33 rows, no ALiBi partials.
    assert re.search(r"-> \(tensor<1x33x2x64xbf16>, tensor<1x33x2x64xbf16>, "
                     r"tensor<1x33x2x64xbf16>, tensor<1x2x128x64xf32>, tensor<1x2x3xi32>, "
                     r"tensor<1x2x0xf32>, tensor<0xf32>\)", call)
    assert "alibi = false" in call


def test_alibi_calls_the_kernels_with_the_slopes(pretend_build):
    """ALiBi runs on the kernels: the slopes [b, h] in float32 follow the fixed operands, the
    backward returns per-64-key partials of dalibi_slopes (3 for 130 keys)."""
    pretend_build(head_dims=(64,))
    hlo = _lower_grad_for_cuda((2, 130, 3, 64), alibi_slopes=jnp.ones((3,)))
    (forward,) = _kernel_calls(hlo)
    (backward,) = _backward_calls(hlo)
    assert _operand_types(forward) == ["tensor<2x130x3x64xbf16>"] * 3 + ["tensor<2x3xf32>"]
    assert _operand_types(backward)[6:] == ["tensor<2x3xf32>"]
    assert backward.endswith("tensor<2x3x3xf32>, tensor<0xf32>)")
    for call in (forward, backward):
        assert "alibi = true" in call


def test_dropout_runs_on_the_kernels_with_its_seed_and_threshold(pretend_build):
    """Dropout runs on both kernels: the per-batch seed uint32 [b, 2] follows ALiBi's slopes and
    the rate goes as a byte threshold (0.25 · 256); without dropout the threshold is 0."""
    pretend_build(head_dims=(64,))
    hlo = _lower_grad_for_cuda((2, 130, 3, 64), alibi_slopes=jnp.ones((3,)), dropout_rate=0.25,
                               dropout_rng=jax.random.key(0))
    (forward,) = _kernel_calls(hlo)
    (backward,) = _backward_calls(hlo)
    assert _operand_types(forward)[3:] == ["tensor<2x3xf32>", "tensor<2x2xui32>"]
    assert _operand_types(backward)[6:] == ["tensor<2x3xf32>", "tensor<2x2xui32>"]
    for call in (forward, backward):
        assert "dropout_threshold = 64 : i32" in call
    (plain,) = _kernel_calls(_lower_grad_for_cuda((2, 130, 3, 64)))
    assert "dropout_threshold = 0 : i32" in plain


def test_mask_and_bias_run_on_the_kernels_in_their_own_shapes(pretend_build):
    """mask and bias go to both kernels in the shapes given (broadcast dimensions stay 1): the
    mask as bits (130 keys padded to 256: 8 words), the bias in its bfloat16; the backward returns
    dbias in float32, in the bias's shape."""
    pretend_build(head_dims=(64,))
    x = jax.ShapeDtypeStruct((2, 130, 3, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 130), jnp.bool_)
    bias = jax.ShapeDtypeStruct((1, 3, 130, 130), jnp.bfloat16)
    loss = lambda q, k, v, mask, bias: jnp.sum(
        jax_flash.flash_attention(q, k, v, mask=mask, bias=bias).astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 4)))
    hlo = grad.trace(x, x, x, mask, bias).lower(lowering_platforms=("cuda",)).as_text()
    (forward,) = _kernel_calls(hlo)
    (backward,) = _backward_calls(hlo)
    operands = ["tensor<2x1x1x8xui32>", "tensor<1x3x130x130xbf16>"]
    assert _operand_types(forward)[3:] == operands
    assert _operand_types(backward)[6:] == operands
    assert backward.rsplit(") -> (", 1)[1].split(", ")[6].startswith("tensor<1x3x130x130xf32>")
    for call in (forward, backward):
        assert "mask = true" in call and "bias = true" in call


@pytest.mark.parametrize("jit_inside", [False, True])
def test_a_bias_that_is_not_differentiated_gets_no_gradient_work(pretend_build, jit_inside):
    """Differentiated with respect to q alone, the bias's gradient goes unused: the backward call
    returns dbias as [0] (the kernel neither computes nor writes it), also through an inner jit,
    and so a bias that broadcasts (over the batch here) stays on the kernel with
    deterministic=True; with respect to the bias too, dbias comes back in its shape, and with
    deterministic=True the backward takes the XLA path."""
    pretend_build(head_dims=(64,))
    x = jax.ShapeDtypeStruct((2, 9, 2, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 2, 9, 9), jnp.float32)

    def backward_calls(argnums, deterministic):
        attention = functools.partial(jax_flash.flash_attention, deterministic=deterministic)
        if jit_inside:
            attention = jax.jit(attention)
        loss = lambda q, k, v, bias: jnp.sum(attention(q, k, v, bias=bias).astype(jnp.float32))
        hlo = jax.jit(jax.grad(loss, argnums=argnums)).trace(x, x, x, bias).lower(
            lowering_platforms=("cuda",)).as_text()
        return [call.rsplit(") -> (", 1)[1].split(", ")[6] for call in _backward_calls(hlo)]

    (dbias,) = backward_calls(0, deterministic=True)
    assert dbias.startswith("tensor<0xf32>")
    (dbias,) = backward_calls((0, 3), deterministic=False)
    assert dbias.startswith("tensor<1x2x9x9xf32>")
    assert not backward_calls((0, 3), deterministic=True)


@pytest.mark.parametrize("bias_shape", [(1, 2, 9, 9), (1, 1, 9, 9), (1, 2, 1, 9)])
def test_deterministic_gradient_of_a_broadcast_bias_takes_the_xla_path(pretend_build, bias_shape):
    """The kernel adds the gradient of a bias that broadcasts (over heads, rows) atomically: with
    deterministic=True the backward takes the XLA path (batch 1: a bias of batch 1 does not
    broadcast), and implementation="cuda" names why."""
    pretend_build(head_dims=(64,))
    x = jax.ShapeDtypeStruct((1, 9, 2, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct(bias_shape, jnp.float32)
    broadcasts = bias_shape != (1, 2, 9, 9)

    def lower(implementation):
        loss = lambda q, k, v, bias: jnp.sum(jax_flash.flash_attention(
            q, k, v, bias=bias, deterministic=True, implementation=implementation))
        return jax.jit(jax.grad(loss, argnums=(0, 3))).trace(x, x, x, bias).lower(
            lowering_platforms=("cuda",)).as_text()

    assert len(_backward_calls(lower(None))) == (0 if broadcasts else 1)
    if broadcasts:
        with pytest.raises(ValueError, match="cannot run deterministic=True with a bias that "
                                             "broadcasts"):
            lower("cuda")
    else:
        assert _backward_calls(lower("cuda"))


def test_softcap_calls_the_kernels_with_its_attribute(pretend_build):
    """softcap runs on the kernels (implementation=None picks them), forward and backward, the cap
    passed as an attribute; without it the attribute is 0 (off)."""
    pretend_build(head_dims=(64,))
    hlo = _lower_grad_for_cuda((1, 9, 2, 64), causal=True, softcap=30.0)
    (forward,) = _kernel_calls(hlo)
    (backward,) = _backward_calls(hlo)
    for call in (forward, backward):
        assert _float_attribute(call, "softcap") == 30.0
        assert _float_attribute(call, "softmax_scale") == pytest.approx(64 ** -0.5, rel=1e-6)
        assert "causal = true" in call
    hlo = _lower_grad_for_cuda((1, 9, 2, 64))
    for call in _kernel_calls(hlo) + _backward_calls(hlo):
        assert _float_attribute(call, "softcap") == 0.0


@pytest.mark.parametrize("setup", [dict(kernels=False), dict(capability=(7, 5))])
def test_grad_falls_back_with_the_forward(pretend_build, setup):
    pretend_build(**setup)
    with pytest.warns(RuntimeWarning):
        hlo = _lower_grad_for_cuda((1, 9, 2, 64))
    assert not _backward_calls(hlo)


def test_xla_implementation_never_calls_the_backward_kernel(pretend_build):
    pretend_build()
    assert not _backward_calls(_lower_grad_for_cuda((1, 9, 2, 64), implementation="xla"))


# ---- packed sequences ------------------------------------------------------------------------

def _segment_ranges_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "custom_call @jax_flash_segment_ranges(" in line]


def test_segment_ids_build_ranges_on_the_gpu_for_both_passes(pretend_build):
    """The ranges target runs before each kernel: ids in, row and key ranges and its workspace
    out (hash tables: 4 arrays per side and row, each a power of two >= 2·seqlen: 4·2·(64 + 64)
    ints for 2 rows of 17 queries and 23 keys), the causal band as window_right = 0; the kernels take row_ranges
    (and the backward key_ranges) and the key ids."""
    pretend_build(head_dims=(64,))
    ids_q = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    ids_k = jax.ShapeDtypeStruct((2, 23), jnp.int32)
    qkv = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in
           ((2, 17, 4, 64), (2, 23, 4, 64), (2, 23, 4, 64))]

    def loss(q, k, v, q_ids, kv_ids):
        out = jax_flash.flash_attention(q, k, v, causal=True, q_segment_ids=q_ids,
                                        kv_segment_ids=kv_ids)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grad.trace(*qkv, ids_q, ids_k).lower(lowering_platforms=("cuda",)).as_text()
    calls = _segment_ranges_calls(hlo)
    assert calls
    for call in calls:
        assert _operand_types(call) == ["tensor<2x17xi32>", "tensor<2x23xi32>"]
        assert "-> (tensor<2x17x4xi32>, tensor<2x23x2xi32>, tensor<1024xi32>)" in call
        assert "window_left = -1 : i32" in call and "window_right = 0 : i32" in call
    (forward,) = _kernel_calls(hlo)
    assert _operand_types(forward)[3:] == ["tensor<2x17x4xi32>", "tensor<2x23xi32>"]
    (backward,) = _backward_calls(hlo)
    assert _operand_types(backward)[6:] == ["tensor<2x17x4xi32>", "tensor<2x23x2xi32>",
                                            "tensor<2x23xi32>"]


# ---- ring attention --------------------------------------------------------------------------

@pytest.mark.parametrize("layout,options,segments", [
    ("contiguous", dict(causal=True, window_size=(5, -1)), False),
    ("zigzag", dict(causal=True), True),
    ("contiguous", dict(window_size=(3, 3)), True),
], ids=["causal-window", "zigzag-causal-segments", "window-segments"])
def test_ring_with_positions_calls_the_kernels_without_conditionals(pretend_build, layout,
                                                                     options, segments):
    """A window or segment ids: every ring step, forward and backward, is a kernel call on
    global positions, the same program on every device, with no conditional (no `case`)."""
    pretend_build(head_dims=(64,))
    ring = functools.partial(jax_flash.ring_attention, axis_name="seq", layout=layout,
                             implementation="cuda", **options)

    def loss(q, k, v, ids):
        out = ring(q, k, v, q_segment_ids=ids if segments else None)
        return jnp.sum(out.astype(jnp.float32))

    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    grad = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                                 in_specs=P(None, "seq"), out_specs=P(None, "seq"),
                                 check_vma=False))
    x = jax.ShapeDtypeStruct((1, 32, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    hlo = grad.trace(x, x, x, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert not re.search(r"\bcase\b", hlo)
    # Two steps, each a forward and a backward kernel call with its ranges.
    assert len(_kernel_calls(hlo)) == 2 and len(_backward_calls(hlo)) == 2
    assert len(_segment_ranges_calls(hlo)) == 4
    assert "collective_permute" in hlo
