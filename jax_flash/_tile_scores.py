"""One tile of attention scores on the XLA path, with every feature: what the blockwise forward
and backward share beyond q·kᵀ.

A tile holds scores [batch, kv_heads, group, block_q, block_k]: the query heads split as
(kv head, position in its group), so query head i meets kv head i // group without k or v ever
being repeated. From s = softmax_scale · q·kᵀ the scores become, in this order,

    softcap:       s = softcap · tanh(s / softcap)
    alibi_slopes:  s = s − slope · |i + seqlen_k − seqlen_q − j|   (bottom-right aligned)
    bias:          s = s + bias
    hidden keys:   s = −inf  (padding, causal, window_size, mask, segment ids)

and dropout, after the softmax, keeps each probability with probability 1 − dropout_rate and
scales it by 1 / (1 − dropout_rate); _dropout draws the mask.

mask and bias keep the shapes they were given (broadcast dimensions stay of size 1), padded to
whole tiles and sliced a tile at a time, so nothing [batch, heads, seqlen_q, seqlen_k] is
materialized that the caller did not pass. Segment ids ([b, seqlen]) are sliced per tile and
compared, so they cost O(seqlen): a query sees a key only when both carry the same id, and a
negative id (padding) sees and is seen by nothing.

Causal, window_size and ALiBi compare the query's position i + seqlen_k − seqlen_q with the
key's position j (bottom-right aligned); per-token positions, when given (flash_attention_varlen),
replace both, so each packed sequence is aligned at its own bottom right.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jax_flash._config import FlashConfig
from jax_flash._dropout import keep_mask


@dataclasses.dataclass(frozen=True)
class TileScores:
    """The features of one attention call, with mask and bias padded to whole tiles."""

    config: FlashConfig
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    block_q: int
    block_k: int
    alibi_slopes: jax.Array | None  # float32 [b, kv_heads, group, 1, 1]
    mask: jax.Array | None  # bool [b | 1, h | 1, sq_padded | 1, sk_padded | 1]
    bias: jax.Array | None  # [b | 1, h | 1, sq_padded | 1, sk_padded | 1]
    dropout_seed: jax.Array | None  # uint32 [b, 2]
    q_segment_ids: jax.Array | None  # int32 [b, sq_padded], -1 (padding) past seqlen_q
    kv_segment_ids: jax.Array | None  # int32 [b, sk_padded], -1 (padding) past seqlen_k
    q_positions: jax.Array | None  # int32 [b, sq_padded]
    kv_positions: jax.Array | None  # int32 [b, sk_padded]

    @classmethod
    def build(cls, config: FlashConfig, q_shape, k_shape, block_q: int, block_k: int, extras):
        """extras: the primitive's operands after q, k, v (and out, lse, dout, dlse), in the order
        of config.extra_operand_names()."""
        batch, seqlen_q, heads, _ = q_shape
        seqlen_k, kv_heads = k_shape[1], k_shape[2]
        named = dict(zip(config.extra_operand_names(), extras, strict=True))
        num_q, num_k = -(-seqlen_q // block_q), -(-seqlen_k // block_k)

        def pad_tiles(x, value):
            pad_q = num_q * block_q - seqlen_q if x.shape[2] > 1 else 0
            pad_k = num_k * block_k - seqlen_k if x.shape[3] > 1 else 0
            return jnp.pad(x, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)), constant_values=value)

        slopes = named.get("alibi_slopes")
        if slopes is not None:
            slopes = slopes.astype(jnp.float32).reshape(batch, kv_heads, -1, 1, 1)

        def pad_rows(x, seqlen, num_blocks, block, value):  # [b, s] per-token operands
            return None if x is None else jnp.pad(
                x, ((0, 0), (0, num_blocks * block - seqlen)), constant_values=value)

        mask, bias = named.get("mask"), named.get("bias")
        return cls(
            config=config, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads,
            block_q=block_q, block_k=block_k, alibi_slopes=slopes,
            mask=None if mask is None else pad_tiles(mask, False),
            bias=None if bias is None else pad_tiles(bias, 0),
            dropout_seed=named.get("dropout_seed"),
            q_segment_ids=pad_rows(named.get("q_segment_ids"), seqlen_q, num_q, block_q, -1),
            kv_segment_ids=pad_rows(named.get("kv_segment_ids"), seqlen_k, num_k, block_k, -1),
            q_positions=pad_rows(named.get("q_positions"), seqlen_q, num_q, block_q, 0),
            kv_positions=pad_rows(named.get("kv_positions"), seqlen_k, num_k, block_k, 0))

    @property
    def may_skip_tiles(self) -> bool:
        """Whether some tiles can be entirely hidden, so a cheap check may skip them."""
        config = self.config
        return (config.causal or config.window_size != (-1, -1) or self.mask is not None
                or self.q_segment_ids is not None)

    # ---- the forward's view ---------------------------------------------------------------

    def visible(self, q_start, k_start):
        """Which keys each query of the tile sees: bool, broadcastable to the tile's scores."""
        _, key = self._positions(q_start, k_start)
        diagonal, key_position = self._aligned_positions(q_start, k_start)
        visible = (key < self.seqlen_k)[None, :]
        left, right = self.config.window_size
        if self.config.causal:
            right = 0 if right == -1 else min(right, 0)
        if right != -1:
            visible = visible & (key_position <= diagonal + right)
        if left != -1:
            visible = visible & (key_position >= diagonal - left)
        if self.mask is not None:
            visible = visible & self._split_heads(self._tile_of(self.mask, q_start, k_start))
        if self.q_segment_ids is not None:
            q_ids = self._rows_of(self.q_segment_ids, q_start, self.block_q)[..., :, None]
            kv_ids = self._rows_of(self.kv_segment_ids, k_start, self.block_k)[..., None, :]
            visible = visible & (q_ids == kv_ids) & (q_ids >= 0)
        return visible

    def scores(self, qk, q_start, k_start):
        """(scores, tanh) of the tile from qk = q·kᵀ in float32, hidden keys at -inf; tanh is
        tanh(s / softcap), which the backward needs (None without softcap)."""
        config = self.config
        scores = qk * config.softmax_scale
        tanh = None
        if config.softcap:
            tanh = jnp.tanh(scores / config.softcap)
            scores = config.softcap * tanh
        if self.alibi_slopes is not None:
            scores = scores - self.alibi_slopes * self._alibi_distance(q_start, k_start)
        if self.bias is not None:
            bias = self._split_heads(self._tile_of(self.bias, q_start, k_start))
            scores = scores + bias.astype(scores.dtype)
        return jnp.where(self.visible(q_start, k_start), scores, -jnp.inf), tanh

    def dropout_keep(self, q_start, k_start):
        """bool [b, kv_heads, group, block_q, block_k]: the probabilities dropout keeps; None
        without dropout."""
        if self.dropout_seed is None:
            return None
        query, key = self._positions(q_start, k_start)
        return keep_mask(self.dropout_seed, self.config.dropout_rate, seqlen_q=self.seqlen_q,
                         kv_heads=self.kv_heads, group=self.heads // self.kv_heads, query=query,
                         key=key)

    # ---- the backward's view --------------------------------------------------------------

    def score_grads(self, dscores, tanh, q_start, k_start):
        """From dscores, the gradient of the final scores of the tile: (d of softmax_scale·q·kᵀ,
        the tile's share of dbias or None, of dalibi_slopes [b, kv_heads, group] or None)."""
        dbias = dalibi = None
        if self.bias is not None:
            batch, kv_heads, group, block_q, block_k = dscores.shape
            flat = dscores.reshape(batch, kv_heads * group, block_q, block_k)
            bias_tile = self._tile_of(self.bias, q_start, k_start)
            dbias = _sum_to_shape(flat, bias_tile.shape)
        if self.alibi_slopes is not None:
            distance = self._alibi_distance(q_start, k_start)
            dalibi = -jnp.sum(dscores * distance, axis=(-2, -1))
        if tanh is not None:
            dscores = dscores * (1 - tanh * tanh)
        return dscores, dbias, dalibi

    def add_bias_grad(self, dbias, tile_grad, q_start, k_start):
        """Adds one tile's dbias into dbias, shaped as the padded bias."""
        starts = self._tile_starts(self.bias, q_start, k_start)
        current = lax.dynamic_slice(dbias, starts, tile_grad.shape)
        return lax.dynamic_update_slice(dbias, current + tile_grad, starts)

    def unpad_bias_grad(self, dbias):
        return dbias[:, :, :min(dbias.shape[2], self.seqlen_q), :min(dbias.shape[3], self.seqlen_k)]

    # ---- helpers ---------------------------------------------------------------------------

    def _positions(self, q_start, k_start):
        return q_start + jnp.arange(self.block_q), k_start + jnp.arange(self.block_k)

    def _aligned_positions(self, q_start, k_start):
        """(the position of the key aligned with each query, each key's position), broadcastable
        to the tile's scores: (block_q, 1) and (1, block_k), or [b, 1, 1, ...] per batch element
        with per-token positions."""
        if self.q_positions is None:
            query, key = self._positions(q_start, k_start)
            return query[:, None] + self.seqlen_k - self.seqlen_q, key[None, :]
        query = self._rows_of(self.q_positions, q_start, self.block_q)[..., :, None]
        key = self._rows_of(self.kv_positions, k_start, self.block_k)[..., None, :]
        return query, key

    def _alibi_distance(self, q_start, k_start):
        diagonal, key_position = self._aligned_positions(q_start, k_start)
        return jnp.abs(diagonal - key_position).astype(jnp.float32)

    @staticmethod
    def _rows_of(x, start, block):
        """The tile's slice of a [b, s] per-token operand, as [b, 1, 1, block] to meet the
        scores' (kv_heads, group) axes."""
        tile = lax.dynamic_slice(x, (jnp.zeros_like(start), start), (x.shape[0], block))
        return tile[:, None, None, :]

    def _tile_starts(self, x, q_start, k_start):
        zero = jnp.zeros_like(q_start)
        return (zero, zero, q_start if x.shape[2] > 1 else zero,
                k_start if x.shape[3] > 1 else zero)

    def _tile_of(self, x, q_start, k_start):
        """The tile of a [b | 1, h | 1, sq | 1, sk | 1] operand; broadcast dimensions stay 1."""
        sizes = (x.shape[0], x.shape[1], self.block_q if x.shape[2] > 1 else 1,
                 self.block_k if x.shape[3] > 1 else 1)
        return lax.dynamic_slice(x, self._tile_starts(x, q_start, k_start), sizes)

    def _split_heads(self, x):
        """[b | 1, h | 1, ...] -> [b | 1, kv_heads | 1, group | 1, ...], to meet the scores."""
        if x.shape[1] == 1:
            return x[:, :, None]
        return x.reshape(x.shape[0], self.kv_heads, -1, *x.shape[2:])


def _sum_to_shape(x, shape):
    """Sums x over the axes where `shape` has 1 and x does not (the reverse of broadcasting)."""
    axes = tuple(i for i, (have, want) in enumerate(zip(x.shape, shape)) if want == 1 != have)
    return jnp.sum(x, axis=axes, keepdims=True)
