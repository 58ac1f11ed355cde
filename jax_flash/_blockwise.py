"""Attention in pure JAX that never holds more than one tile of scores: the XLA path.

It is the CPU lowering, the fallback on GPUs the kernels cannot serve, and the tests' fast cousin
of the dense oracle. Queries are taken a block at a time (lax.map) and each block scans the key
blocks with an online softmax: a running row max and row sum, rescaled as each key block arrives.
Memory is O(seqlen) for any seqlen, so 16k tokens fit on a laptop. Its gradient is in
_blockwise_bwd, which shares the tiling helpers here.

Semantics are the kernel's: products of the inputs' dtype accumulate in float32, the
probabilities are cast to v's dtype before multiplying v (as FlashAttention does), causal
attention is bottom-right aligned, and a query that sees no key gets out = 0 and lse = -inf.
"""

import jax.numpy as jnp
from jax import lax

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


def visible_keys(query, key, *, seqlen_q: int, seqlen_k: int, causal: bool):
    """Which keys of a tile each query sees: (block_q | 1, block_k) from absolute positions
    query (block_q,) and key (block_k,). Padded keys are hidden; causal is bottom-right aligned."""
    visible = (key < seqlen_k)[None, :]
    if causal:
        visible = visible & (key[None, :] <= query[:, None] + seqlen_k - seqlen_q)
    return visible


# ---- forward ----------------------------------------------------------------------------------

def blockwise_attention(q, k, v, *, causal: bool, softmax_scale: float,
                        block_q: int | None = None, block_k: int | None = None):
    """out [b, sq, h, d] in q's dtype and lse [b, h, sq] float32 of softmax(q k^T * scale) v.

    block_q and block_k default to a tile size chosen from batch * heads; any sizes give the same
    result up to rounding.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    acc_dtype, precision = matmul_settings(q.dtype)
    block_q, block_k = block_sizes(batch * heads, seqlen_q, seqlen_k, block_q, block_k)

    q_blocks = to_blocks(q, block_q)  # (num_q_blocks, b, h, block_q, d)
    k_blocks = to_blocks(k, block_k)  # (num_k_blocks, b, h, block_k, d)
    v_blocks = to_blocks(v, block_k)  # (num_k_blocks, b, h, block_k, d)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k

    def attend_query_block(q_block_and_start):
        q_block, q_start = q_block_and_start
        query = q_start + jnp.arange(block_q)

        def visit_key_block(carry, kv_block_and_start):
            k_block, v_block, k_start = kv_block_and_start
            key = k_start + jnp.arange(block_k)
            visible = visible_keys(query, key, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                   causal=causal)  # (block_q | 1, block_k)

            def update(carry):
                row_max, row_sum, acc = carry
                scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block, precision=precision,
                                    preferred_element_type=acc_dtype)
                scores = jnp.where(visible, scores * softmax_scale, -jnp.inf)
                new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
                # A row with nothing visible yet keeps max -inf; shifting by 0 keeps exp() at 0.
                shift = jnp.where(jnp.isneginf(new_max), 0, new_max)
                probs = jnp.exp(scores - shift[..., None])
                correction = jnp.exp(row_max - shift)
                row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bhqk,bhkd->bhqd", probs.astype(v.dtype), v_block, precision=precision,
                    preferred_element_type=acc_dtype)
                return new_max, row_sum, acc

            if causal:
                # Causal attention leaves about half the tiles empty: skip them.
                carry = lax.cond(jnp.any(visible), update, lambda carry: carry, carry)
            else:
                carry = update(carry)
            return carry, None

        init = (
            jnp.full((batch, heads, block_q), -jnp.inf, acc_dtype),  # row_max
            jnp.zeros((batch, heads, block_q), acc_dtype),  # row_sum
            jnp.zeros((batch, heads, block_q, head_dim), acc_dtype),  # acc
        )
        (row_max, row_sum, acc), _ = lax.scan(
            visit_key_block, init, (k_blocks, v_blocks, k_starts))
        out = acc / jnp.where(row_sum == 0, 1, row_sum)[..., None]
        lse = jnp.where(row_sum == 0, -jnp.inf, row_max + jnp.log(row_sum))
        return out.astype(q.dtype), lse.astype(jnp.float32)

    out, lse = lax.map(attend_query_block, (q_blocks, q_starts))
    return from_blocks(out, seqlen_q), rows_from_blocks(lse, seqlen_q)
