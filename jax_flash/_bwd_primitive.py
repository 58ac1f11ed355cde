"""The backward primitive: abstract eval, lowering and batching rule.

  operands q [b, sq, h, d], k [b, sk, h, d], v [b, sk, h, d] (one dtype), out [b, sq, h, d] and
           lse float32 [b, h, sq] (the forward's results), dout [b, sq, h, d] and dlse float32
           [b, h, sq] (their cotangents)
  results  dq, dk, dv, shaped and typed as q, k, v
  params   config: the forward's FlashConfig

Every platform, CUDA included, lowers it to the blockwise XLA backward for now; the CUDA backward
kernel will become the CUDA lowering (see _cuda_lowering).
"""

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir, xla

from jax_flash._batching import register_batch_folding
from jax_flash._blockwise_bwd import blockwise_attention_bwd
from jax_flash._config import FlashConfig
from jax_flash._validation import check_qkv

flash_bwd_p = Primitive("jax_flash_bwd")
flash_bwd_p.multiple_results = True
flash_bwd_p.def_impl(functools.partial(xla.apply_primitive, flash_bwd_p))


def _abstract_eval(q, k, v, out, lse, dout, dlse, *, config: FlashConfig):
    check_qkv(q, k, v)
    batch, seqlen_q, heads, _ = q.shape
    for name, x, shape, dtype in (("out", out, q.shape, q.dtype), ("dout", dout, q.shape, q.dtype),
                                  ("lse", lse, (batch, heads, seqlen_q), jnp.float32),
                                  ("dlse", dlse, (batch, heads, seqlen_q), jnp.float32)):
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(
                f"jax-flash: the backward expects {name} {jnp.dtype(dtype).name}{list(shape)}; "
                f"got {jnp.dtype(x.dtype).name}{list(x.shape)}")
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v))


flash_bwd_p.def_abstract_eval(_abstract_eval)


# ---- lowering --------------------------------------------------------------------------------

def _lower_blockwise(ctx, *operands, config: FlashConfig):
    backward = functools.partial(
        blockwise_attention_bwd, causal=config.causal, softmax_scale=config.softmax_scale)
    return mlir.lower_fun(backward, multiple_results=True)(ctx, *operands)


def _cuda_lowering(ctx, *operands, config: FlashConfig):
    # Where the CUDA backward kernel slots in: it will be chosen here as the forward's is in
    # _fwd_primitive._cuda_lowering (dtype, build, compute capability, head dim, implementation),
    # with config.deterministic choosing how it reduces dq. Until then CUDA runs the XLA path,
    # which is deterministic.
    return _lower_blockwise(ctx, *operands, config=config)


mlir.register_lowering(flash_bwd_p, _lower_blockwise)
mlir.register_lowering(flash_bwd_p, _cuda_lowering, platform="cuda")


# ---- batching --------------------------------------------------------------------------------

register_batch_folding(flash_bwd_p)
