"""The gradient of blockwise attention in pure JAX, recomputing each tile of scores: the XLA path.

FlashAttention-2's backward. From lse the forward saved, each tile's probabilities come back as
p = exp(scale·q kᵀ − lse) without a second softmax pass; with D = rowsum(dout ∘ out) − dlse,

    dv = pᵀ dout,   dp = dout vᵀ,   ds = p ∘ (dp − D),   dq = scale · ds k,   dk = scale · dsᵀ q.

(The −dlse in D is lse's own cotangent: d lse / d s = p, which adds p · dlse to ds.)

An outer scan walks the key blocks and carries dq for every query; for each key block an inner
scan walks the query blocks, accumulating that key block's dk and dv and emitting each query
block's share of dq. Memory is O(seqlen · head_dim) for dq, dk, dv plus a few tiles of scores,
never seqlen². Tiles that no query sees are skipped, as in the forward. Under grouped-query
attention each kv head's dk and dv sum over its group of query heads inside the products, with
no repeated copy of k or v. Dropout, softcap, ALiBi and bias follow the chain rule through
_tile_scores: with dropout mask M (kept entries scaled by 1 / (1 − rate)), dv takes (p ∘ M)ᵀ dout
and dp becomes dp ∘ M; dbias is ds summed over the bias's broadcast dimensions; softcap scales ds
by 1 − tanh².

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
    group_query_heads,
    matmul_settings,
    rows_to_blocks,
    to_blocks,
)
from jax_flash._config import FlashConfig
from jax_flash._tile_scores import TileScores


def blockwise_attention_bwd(q, k, v, out, lse, dout, dlse, *extras, causal: bool,
                            softmax_scale: float, block_q: int | None = None,
                            block_k: int | None = None, **features):
    """(dq, dk, dv[, dbias][, dalibi_slopes]) for cotangents dout of out and dlse of lse.

    q [b, sq, h, d], k and v [b, sk, kv_heads, d], out and dout [b, sq, h, d], lse and dlse
    float32 [b, h, sq], with out and lse from blockwise_attention or the kernel on the same
    inputs. features and extras as in blockwise_attention; dq, dk, dv come in the dtypes of
    q, k, v, dbias (when there is a bias) in the bias's shape and dtype, dalibi_slopes (when
    there are slopes) float32 [b, h]. block_q and block_k as in blockwise_attention.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    config = FlashConfig(causal=causal, softmax_scale=softmax_scale, implementation="xla",
                         **features)
    acc_dtype, precision = matmul_settings(q.dtype)
    block_q, block_k = block_sizes(batch * heads, seqlen_q, seqlen_k, block_q, block_k)
    tiles = TileScores.build(config, q.shape, k.shape, block_q, block_k, extras)
    keep_scale = 1 / (1 - config.dropout_rate)

    def matmul(spec, a, b):
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=acc_dtype)

    # A product and a sum, not a dot: a GPU would run a float32 dot at TF32 precision.
    delta = jnp.sum(dout.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)  # [b, sq, h]
    delta = delta.transpose(0, 2, 1) - dlse  # [b, h, sq]
    # exp(s - lse) must be exactly 0, never NaN, on rows that see no key (lse = -inf) and on the
    # padded query rows: an lse of +inf gives that for every finite or masked (-inf) score.
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    def query_rows(x, padding):  # [b, h, sq] -> (num_q_blocks, b, kv_heads, group, block_q)
        blocks = rows_to_blocks(x, block_q, padding)
        return blocks.reshape(blocks.shape[:2] + (kv_heads, group, block_q))

    # (num_q_blocks, b, kv_heads, group, block_q, d)
    q_blocks = group_query_heads(to_blocks(q, block_q), kv_heads)
    dout_blocks = group_query_heads(to_blocks(dout, block_q), kv_heads)
    lse_blocks = query_rows(lse, jnp.inf)  # (num_q_blocks, b, kv_heads, group, block_q)
    delta_blocks = query_rows(delta, 0)  # (num_q_blocks, b, kv_heads, group, block_q)
    k_blocks = to_blocks(k, block_k)  # (num_k_blocks, b, kv_heads, block_k, d)
    v_blocks = to_blocks(v, block_k)  # (num_k_blocks, b, kv_heads, block_k, d)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k
    zero_dq_block = jnp.zeros(q_blocks.shape[1:], acc_dtype)
    zero_dkv_block = jnp.zeros(k_blocks.shape[1:], acc_dtype)
    # Gradients of the feature operands, carried across every tile (None where absent).
    dbias = (None if tiles.bias is None or not config.bias_grad
             else jnp.zeros(tiles.bias.shape, acc_dtype))
    dalibi = None if tiles.alibi_slopes is None else jnp.zeros(q_blocks.shape[1:4], acc_dtype)

    def visit_key_block(carry, kv_block_and_start):
        dq, feature_grads = carry
        k_block, v_block, k_start = kv_block_and_start

        def visit_query_block(inner, q_rows):
            q_block, dout_block, lse_block, delta_block, q_start = q_rows

            def update(inner):
                (dk, dv), (dbias, dalibi) = inner
                scores, tanh = tiles.scores(matmul("bkgqd,bkjd->bkgqj", q_block, k_block),
                                            q_start, k_start)
                probs = jnp.exp(scores - lse_block[..., None])
                dprobs = matmul("bkgqd,bkjd->bkgqj", dout_block, v_block)
                keep = tiles.dropout_keep(q_start, k_start)
                kept = probs
                if keep is not None:  # out saw the kept probabilities, scaled by 1 / (1 - rate)
                    kept = jnp.where(keep, probs * keep_scale, 0)
                    dprobs = jnp.where(keep, dprobs * keep_scale, 0)
                dv = dv + matmul("bkgqj,bkgqd->bkjd", kept.astype(v.dtype), dout_block)
                dscores = probs * (dprobs - delta_block[..., None])
                dscores, dbias_tile, dalibi_tile = tiles.score_grads(
                    dscores, tanh, q_start, k_start)
                if dbias is not None:
                    dbias = tiles.add_bias_grad(dbias, dbias_tile, q_start, k_start)
                if dalibi is not None:
                    dalibi = dalibi + dalibi_tile
                dscores = dscores.astype(q.dtype)
                dk = dk + matmul("bkgqj,bkgqd->bkjd", dscores, q_block)
                dq_part = matmul("bkgqj,bkjd->bkgqd", dscores, k_block)
                return ((dk, dv), (dbias, dalibi)), dq_part

            if tiles.may_skip_tiles:
                # Causal, window and mask leave tiles that no query sees: skip them.
                visible = tiles.visible(q_start, k_start)
                return lax.cond(jnp.any(visible), update,
                                lambda inner: (inner, zero_dq_block), inner)
            return update(inner)

        ((dk, dv), feature_grads), dq_parts = lax.scan(
            visit_query_block, ((zero_dkv_block, zero_dkv_block), feature_grads),
            (q_blocks, dout_blocks, lse_blocks, delta_blocks, q_starts))
        return (dq + dq_parts, feature_grads), (dk, dv)

    # softmax_scale multiplies dq and dk once, in float32, as the kernel does, rather than ds
    # before it is rounded to the inputs' dtype.
    (dq, (dbias, dalibi)), (dk, dv) = lax.scan(
        visit_key_block, (jnp.zeros(q_blocks.shape, acc_dtype), (dbias, dalibi)),
        (k_blocks, v_blocks, k_starts))
    dq = from_blocks(dq.reshape(dq.shape[:2] + (heads,) + dq.shape[4:]) * softmax_scale, seqlen_q)
    dk = from_blocks(dk * softmax_scale, seqlen_k)
    dv = from_blocks(dv, seqlen_k)
    grads = [dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)]
    if dbias is not None:
        bias = dict(zip(config.extra_operand_names(), extras))["bias"]
        grads.append(tiles.unpad_bias_grad(dbias).astype(bias.dtype))
    if dalibi is not None:
        grads.append(dalibi.reshape(batch, heads).astype(jnp.float32))
    return tuple(grads)
