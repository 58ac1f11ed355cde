"""Shared fixtures; tests marked `gpu` skip where JAX sees no CUDA GPU."""

import os

# Under pytest-xdist several worker processes share one GPU: none may take most of its memory up
# front (JAX's default). Set before JAX creates a backend.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Eight host CPU devices for the sharding and ring attention tests. It must be set before JAX
# creates its CPU backend; computations still run on the first device unless placed otherwise.
jax.config.update("jax_num_cpu_devices", 8)


def _cuda_gpu_visible() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_gpu_visible():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, and JAX sees none (no 'cuda' backend)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """float64 for one test only: x64 stays off for the rest of the session."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def on_cpu():
    """Runs the test's computations on the CPU, whatever the default backend is."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def make_qkv():
    """Returns make(batch, seqlen_q, seqlen_k, heads, head_dim, dtype, seed=0) -> (q, k, v).

    Fresh standard-normal inputs: never zeros or constants, which hide layout and masking bugs.
    """

    def make(batch, seqlen_q, seqlen_k, heads, head_dim, dtype=jnp.float32, seed=0):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((batch, seqlen_q, heads, head_dim))
        k = rng.standard_normal((batch, seqlen_k, heads, head_dim))
        v = rng.standard_normal((batch, seqlen_k, heads, head_dim))
        return tuple(jnp.asarray(x, dtype) for x in (q, k, v))

    return make
