"""Attention in pure JAX that never holds more than one tile of scores: the XLA path.

It is the CPU lowering, the fallback on GPUs the kernels cannot serve, and the tests' fast cousin
of the dense oracle. Queries are taken a block at a time (lax.map) and each block scans the key
blocks with an online softmax: a running row max and row sum, rescaled as each key block arrives.
Memory is O(seqlen) for any seqlen, so 16k tokens fit on a laptop. Its gradient is in
_blockwise_bwd, which shares the tiling helpers here.

Semantics are the kernel's: products of the inputs' dtype accumulate in float32, the
probabilities are cast to v's dtype before multiplying v (as FlashAttention does), causal
attention is bottom-right aligned, and a query that sees no key gets out = 0 and lse = -inf.
Grouped-query attention and the features of _tile_scores (windows, softcap, ALiBi, mask, bias,
dropout) run here too; tiles that no query sees are skipped.
"""

import dataclasses

import jax.numpy as jnp
from jax import lax

from jax_flash._config import FlashConfig
from jax_flash._tile_scores import TileScores

# One tile of scores holds batch * heads * block_q * block_k floats. Square tiles grow from
# MIN_BLOCK up to MAX_BLOCK while the tile stays within TILE_ELEMENTS (16 Mi floats, 64 MiB in
# float32): few batch * heads get large tiles, which keep a GPU busy and the loop short; many get
# small ones, which bound the memory. Neither depends on seqlen, so memory stays O(seqlen).
MIN_BLOCK = 128
MAX_BLOCK = 1024
TILE_ELEMENTS = 2**24


def _default_block(batch_heads: int) -> int:
    block = MIN_BLOCK
    while block < MAX_BLOCK and batch_heads * (2 * block) ** 2 <= TILE_ELEMENTS:
        block *= 2
    return block


# ---- shared with the backward (_blockwise_bwd) -------------------------------------------------

def block_sizes(batch_heads: int, seqlen_q: int, seqlen_k: int, block_q: int | None,
                block_k: int | None) -> tuple[int, int]:
    """The tile (block_q, block_k): the caller's sizes or the default, never beyond the seqlens."""
    default_block = _default_block(batch_heads)
    return min(block_q or default_block, seqlen_q), min(block_k or default_block, seqlen_k)


def matmul_settings(dtype) -> tuple[jnp.dtype, lax.Precision]:
    """The accumulation dtype of products of `dtype` inputs, and the precision they run at."""
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    # Full-precision inputs get full-precision products, not a TF32 shortcut.
    precision = lax.Precision.HIGHEST if dtype == acc_dtype else lax.Precision.DEFAULT
    return acc_dtype, precision


def to_blocks(x, block: int):
    """[b, s, h, d] -> [s_padded / block, b, h, block, d], zero-padding s to a block multiple."""
    batch, seqlen, heads, head_dim = x.shape
    num_blocks = -(-seqlen // block)
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - seqlen), (0, 0), (0, 0)))
    x = x.reshape(batch, num_blocks, block, heads, head_dim)
    return x.transpose(1, 0, 3, 2, 4)


def from_blocks(blocks, seqlen: int):
    """[num_blocks, b, h, block, d] -> [b, seqlen, h, d]: to_blocks undone, padding dropped."""
    _, batch, heads, _, head_dim = blocks.shape
    return blocks.transpose(1, 0, 3, 2, 4).reshape(batch, -1, heads, head_dim)[:, :seqlen]


def rows_to_blocks(x, block: int, padding):
    """[b, h, s] (one value per query row, as lse) -> [s_padded / block, b, h, block], the tail
    filled with `padding`."""
    batch, heads, seqlen = x.shape
    num_blocks = -(-seqlen // block)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, num_blocks * block - seqlen)), constant_values=padding)
    return x.reshape(batch, heads, num_blocks, block).transpose(2, 0, 1, 3)


def rows_from_blocks(blocks, seqlen: int):
    """[num_blocks, b, h, block] -> [b, h, seqlen]: rows_to_blocks undone."""
    _, batch, heads, _ = blocks.shape
    return blocks.transpose(1, 2, 0, 3).reshape(batch, heads, -1)[:, :, :seqlen]


def options_of(config: FlashConfig) -> dict:
    """The keyword arguments of blockwise_attention(_bwd) that carry `config`'s semantics."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
            if field.name not in ("implementation", "deterministic")}


def group_query_heads(x, kv_heads: int):
    """[..., h, rows, d] blocks -> [..., kv_heads, h / kv_heads, rows, d]: query head i becomes
    (i // group, i % group), next to the kv head it attends with."""
    *lead, heads, rows, head_dim = x.shape
    return x.reshape(*lead, kv_heads, heads // kv_heads, rows, head_dim)


# ---- forward ----------------------------------------------------------------------------------

def blockwise_attention(q, k, v, *extras, causal: bool, softmax_scale: float,
                        block_q: int | None = None, block_k: int | None = None, **features):
    """out [b, sq, h, d] in q's dtype and lse [b, h, sq] float32 of softmax(q k^T * scale) v.

    k and v have kv_heads dividing h (grouped-query attention). features are FlashConfig's
    feature fields (window_size, softcap, dropout_rate, has_alibi_slopes, has_mask, has_bias,
    has_segment_ids, has_positions) and
    extras the operands they call for, in the order of FlashConfig.extra_operand_names(); see
    _tile_scores for their semantics. block_q and block_k default to a tile size chosen from
    batch * heads; any sizes give the same result up to rounding (and the same dropout mask).
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    config = FlashConfig(causal=causal, softmax_scale=softmax_scale, implementation="xla",
                         **features)
    acc_dtype, precision = matmul_settings(q.dtype)
    block_q, block_k = block_sizes(batch * heads, seqlen_q, seqlen_k, block_q, block_k)
    tiles = TileScores.build(config, q.shape, k.shape, block_q, block_k, extras)

    # (num_q_blocks, b, kv_heads, group, block_q, d)
    q_blocks = group_query_heads(to_blocks(q, block_q), kv_heads)
    k_blocks = to_blocks(k, block_k)  # (num_k_blocks, b, kv_heads, block_k, d)
    v_blocks = to_blocks(v, block_k)  # (num_k_blocks, b, kv_heads, block_k, d)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k
    rows_shape = q_blocks.shape[1:-1]  # (b, kv_heads, group, block_q)

    def attend_query_block(q_block_and_start):
        q_block, q_start = q_block_and_start

        def visit_key_block(carry, kv_block_and_start):
            k_block, v_block, k_start = kv_block_and_start

            def update(carry):
                row_max, row_sum, acc = carry
                qk = jnp.einsum("bkgqd,bkjd->bkgqj", q_block, k_block, precision=precision,
                                preferred_element_type=acc_dtype)
                scores, _ = tiles.scores(qk, q_start, k_start)
                new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
                # A row with nothing visible yet keeps max -inf; shifting by 0 keeps exp() at 0.
                shift = jnp.where(jnp.isneginf(new_max), 0, new_max)
                probs = jnp.exp(scores - shift[..., None])
                correction = jnp.exp(row_max - shift)
                row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
                keep = tiles.dropout_keep(q_start, k_start)
                if keep is not None:  # the 1 / (1 - rate) rescale waits for the end
                    probs = jnp.where(keep, probs, 0)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bkgqj,bkjd->bkgqd", probs.astype(v.dtype), v_block, precision=precision,
                    preferred_element_type=acc_dtype)
                return new_max, row_sum, acc

            if tiles.may_skip_tiles:
                # Causal, window and mask leave tiles that no query sees: skip them.
                visible = tiles.visible(q_start, k_start)
                carry = lax.cond(jnp.any(visible), update, lambda carry: carry, carry)
            else:
                carry = update(carry)
            return carry, None

        init = (
            jnp.full(rows_shape, -jnp.inf, acc_dtype),  # row_max
            jnp.zeros(rows_shape, acc_dtype),  # row_sum
            jnp.zeros((*rows_shape, head_dim), acc_dtype),  # acc
        )
        (row_max, row_sum, acc), _ = lax.scan(
            visit_key_block, init, (k_blocks, v_blocks, k_starts))
        normalizer = jnp.where(row_sum == 0, 1, row_sum) * (1 - config.dropout_rate)
        out = acc / normalizer[..., None]
        lse = jnp.where(row_sum == 0, -jnp.inf, row_max + jnp.log(row_sum))
        # (b, kv_heads, group, ...) -> (b, heads, ...): the query heads in their own order.
        out = out.reshape(batch, heads, block_q, head_dim)
        lse = lse.reshape(batch, heads, block_q)
        return out.astype(q.dtype), lse.astype(jnp.float32)

    out, lse = lax.map(attend_query_block, (q_blocks, q_starts))
    return from_blocks(out, seqlen_q), rows_from_blocks(lse, seqlen_q)
