"""Per-row key intervals (and per-key query intervals) for the CUDA kernels' segment ids and
flash_attention_varlen, so they skip whole tiles instead of comparing ids element by element.
Built on the GPU by the jax_flash_segment_ranges target (cuda/segment_ranges.h), in O(seqlen):
a hash table per batch row gives each segment the first and last index of its tokens and how
many runs they form; every row takes its segment's keys cut by the band, every key its segment's
queries.

Visibility (the rule of _tile_scores.TileScores.visible): query i sees key j iff both carry the
same segment id >= 0 and the band holds,

    diagonal_i − left <= position_j <= diagonal_i + right

with diagonal_i = i + seqlen_k − seqlen_q and position_j = j, or q_positions[i] and
kv_positions[j] when positions are given; causal makes right = min(right, 0) (0 when unbounded),
and -1 leaves a side unbounded.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _extension

_INT32_MAX = np.iinfo(np.int32).max


def kernel_ranges(q_segment_ids, kv_segment_ids, q_positions=None, kv_positions=None, *,
                  causal: bool, window_size: tuple[int, int]):
    """-> (row_ranges int32 [b, sq, 4], key_ranges int32 [b, sk, 2]), computed on the GPU.

    Args:
      q_segment_ids, kv_segment_ids: int [b, sq], [b, sk]; equal ids are one segment wherever
        their tokens lie (unsorted, non-contiguous ids are fine); negative ids are padding,
        which sees nothing and is seen by nothing.
      q_positions, kv_positions: None, or int [b, sq], [b, sk] per-token positions replacing
        i + sk − sq and j in the band (flash_attention_varlen's _sequence_layout, ring
        attention's global positions). They must then be non-decreasing over each segment's
        extent (its first token to its last), as both layouts are: the band is cut by
        bisection.
      causal, window_size: as in FlashConfig.

    Returns:
      row_ranges[b, i] = (lo, hi, exact, seg), seg = q_segment_ids[b, i]: every key row i sees
        lies in [lo, hi); (0, 0) when its segment has no key within the band (padding rows
        included). exact == 1 when the segment is contiguous in kv: then [lo, hi) is exactly
        the keys row i sees, and the kernel applies only its own band there (the band above
        without positions, within which [lo, hi) lies; none with positions). exact == 0: [lo,
        hi) is the segment's extent cut by the band, and the kernel compares kv_segment_ids
        with seg as well, which then decides: row i sees key j in [lo, hi) iff kernel_band(i,
        j) and kv_segment_ids[b, j] == seg.
      key_ranges[b, j] = (qlo, qhi): every query that sees key j lies in [qlo, qhi), band
        included (so causal varlen's backward skips the query tiles above each sequence's
        diagonal); exactly their hull when the key's segment is contiguous in q; (0, 0) when
        none does (padding keys included).
    """
    q_ids, kv_ids = (jnp.asarray(x).astype(jnp.int32) for x in (q_segment_ids, kv_segment_ids))
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("jax-flash: kernel_ranges takes both positions or neither")
    positions = () if q_positions is None else tuple(
        jnp.asarray(x).astype(jnp.int32) for x in (q_positions, kv_positions))
    batch, seqlen_q = q_ids.shape
    seqlen_k = kv_ids.shape[1]
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    results = (jax.ShapeDtypeStruct((batch, seqlen_q, 4), jnp.int32),
               jax.ShapeDtypeStruct((batch, seqlen_k, 2), jnp.int32),
               jax.ShapeDtypeStruct((_workspace_ints(batch, seqlen_q, seqlen_k),), jnp.int32))
    row_ranges, key_ranges, _ = jax.ffi.ffi_call(_extension.SEGMENT_RANGES_TARGET, results)(
        q_ids, kv_ids, *positions, window_left=np.int32(min(left, _INT32_MAX)),
        window_right=np.int32(min(right, _INT32_MAX)))
    return row_ranges, key_ranges


def _workspace_ints(batch: int, seqlen_q: int, seqlen_k: int) -> int:
    """segment_ranges_workspace_ints of cuda/segment_ranges.cu (the handler checks the two
    agree): four int32 arrays per side and batch row, each of a power of two >= 2·seqlen."""
    def capacity(seqlen):
        return 1 << max(1, (2 * seqlen - 1).bit_length())
    return 4 * batch * (capacity(seqlen_k) + capacity(seqlen_q))
