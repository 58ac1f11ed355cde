"""The gradient of blockwise attention in pure JAX, recomputing each tile of scores: the XLA path.

FlashAttention-2's backward. From lse the forward saved, each tile's probabilities come back as
p = exp(scale·q kᵀ − lse) without a second softmax pass; with D = rowsum(dout ∘ out) − dlse,

    dv = pᵀ dout,   dp = dout vᵀ,   ds = p ∘ (dp − D),   dq = scale · ds k,   dk = scale · dsᵀ q.

(The −dlse in D is lse's own cotangent: d lse / d s = p, which adds p · dlse to ds.)

An outer scan walks the key blocks and carries dq for every query; for each key block an inner
scan walks the query blocks, accumulating that key block's dk and dv and emitting each query
block's share of dq. Memory is O(seqlen · head_dim) for dq, dk, dv plus a few tiles of scores,
never seqlen². Causal tiles that no query sees are skipped, as in the forward.

Semantics are the kernel's and the forward's (_blockwise): products of the inputs' dtype
accumulate in float32, p and ds are cast to the inputs' dtype before their products (as
FlashAttention does), and rows that see no key (lse = -inf) contribute exactly nothing. Every
sum runs in a fixed order, so the result is bitwise reproducible.
"""

import jax.numpy as jnp
from jax import lax

from jax_flash._blockwise import (
    block_sizes,
    from_blocks,
    matmul_settings,
    rows_to_blocks,
    to_blocks,
    visible_keys,
)


def blockwise_attention_bwd(q, k, v, out, lse, dout, dlse, *, causal: bool, softmax_scale: float,
                            block_q: int | None = None, block_k: int | None = None):
    """(dq, dk, dv) in the dtypes of (q, k, v), for cotangents dout of out and dlse of lse.

    q [b, sq, h, d], k and v [b, sk, h, d], out and dout [b, sq, h, d], lse and dlse float32
    [b, h, sq], with out and lse from blockwise_attention or the kernel on the same inputs.
    block_q and block_k as in blockwise_attention.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    acc_dtype, precision = matmul_settings(q.dtype)
    block_q, block_k = block_sizes(batch * heads, seqlen_q, seqlen_k, block_q, block_k)

    def matmul(spec, a, b):
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=acc_dtype)

    # A product and a sum, not a dot: a GPU would run a float32 dot at TF32 precision.
    delta = jnp.sum(dout.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)  # [b, sq, h]
    delta = delta.transpose(0, 2, 1) - dlse  # [b, h, sq]
    # exp(s - lse) must be exactly 0, never NaN, on rows that see no key (lse = -inf) and on the
    # padded query rows: an lse of +inf gives that for every finite or masked (-inf) score.
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    q_blocks = to_blocks(q, block_q)  # (num_q_blocks, b, h, block_q, d)
    dout_blocks = to_blocks(dout, block_q)  # (num_q_blocks, b, h, block_q, d)
    lse_blocks = rows_to_blocks(lse, block_q, jnp.inf)  # (num_q_blocks, b, h, block_q)
    delta_blocks = rows_to_blocks(delta, block_q, 0)  # (num_q_blocks, b, h, block_q)
    k_blocks = to_blocks(k, block_k)  # (num_k_blocks, b, h, block_k, d)
    v_blocks = to_blocks(v, block_k)  # (num_k_blocks, b, h, block_k, d)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k
    zero_dq_block = jnp.zeros((batch, heads, block_q, head_dim), acc_dtype)
    zero_dkv_block = jnp.zeros((batch, heads, block_k, head_dim), acc_dtype)

    def visit_key_block(dq, kv_block_and_start):
        k_block, v_block, k_start = kv_block_and_start
        key = k_start + jnp.arange(block_k)

        def visit_query_block(dkv, q_rows):
            q_block, dout_block, lse_block, delta_block, q_start = q_rows
            query = q_start + jnp.arange(block_q)
            visible = visible_keys(query, key, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                   causal=causal)  # (block_q | 1, block_k)

            def update(dkv):
                dk, dv = dkv
                scores = matmul("bhqd,bhkd->bhqk", q_block, k_block) * softmax_scale
                scores = jnp.where(visible, scores, -jnp.inf)
                probs = jnp.exp(scores - lse_block[..., None])
                dv = dv + matmul("bhqk,bhqd->bhkd", probs.astype(v.dtype), dout_block)
                dprobs = matmul("bhqd,bhkd->bhqk", dout_block, v_block)
                dscores = (probs * (dprobs - delta_block[..., None])).astype(q.dtype)
                dk = dk + matmul("bhqk,bhqd->bhkd", dscores, q_block)
                return (dk, dv), matmul("bhqk,bhkd->bhqd", dscores, k_block)

            if causal:
                # Causal attention leaves about half the tiles empty: skip them.
                return lax.cond(jnp.any(visible), update,
                                lambda dkv: (dkv, zero_dq_block), dkv)
            return update(dkv)

        (dk, dv), dq_parts = lax.scan(
            visit_query_block, (zero_dkv_block, zero_dkv_block),
            (q_blocks, dout_blocks, lse_blocks, delta_blocks, q_starts))
        return dq + dq_parts, (dk, dv)

    # softmax_scale multiplies dq and dk once, in float32, as the kernel does, rather than ds
    # before it is rounded to the inputs' dtype.
    dq, (dk, dv) = lax.scan(visit_key_block, jnp.zeros(q_blocks.shape, acc_dtype),
                            (k_blocks, v_blocks, k_starts))
    dq = from_blocks(dq * softmax_scale, seqlen_q)
    dk = from_blocks(dk * softmax_scale, seqlen_k)
    dv = from_blocks(dv, seqlen_k)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
