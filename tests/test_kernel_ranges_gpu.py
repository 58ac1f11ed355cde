"""kernel_ranges (the jax_flash_segment_ranges target) against the visibility matrix
brute-forced with numpy: sorted packs (single-token and empty segments, padding at the end),
unsorted and non-contiguous ids with padding in the middle, seqlen_q != seqlen_k, causal and
window_size, and varlen's layout from random cu_seqlens (empty sequences included), eagerly and
under jit. GPU only."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash._kernel_ranges import kernel_ranges
from jax_flash import _extension
from jax_flash._varlen import _sequence_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not _extension.kernels_built(), reason=f"no CUDA kernels: {_extension.why_no_kernels()}")]

WINDOWS = [(-1, -1), (0, 0), (2, 0), (0, 3), (1, 1), (3, -1), (-1, 2), (5, 4)]
OPTIONS = list(itertools.product([False, True], WINDOWS))
Q_WIDTH, K_WIDTH = 38, 41  # sorted packs and varlen layouts, padded at the end


def _band(causal, window_size):
    left, right = window_size
    if causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def _in_band(q_coord, kv_coord, causal, window_size):
    """bool [sq, sk]: kv_coord[j] within the band around q_coord[i]."""
    left, right = _band(causal, window_size)
    ok = np.ones((len(q_coord), len(kv_coord)), bool)
    if right != -1:
        ok &= kv_coord[None, :] <= q_coord[:, None] + right
    if left != -1:
        ok &= kv_coord[None, :] >= q_coord[:, None] - left
    return ok


def _coords(q_ids, kv_ids, q_pos, kv_pos):
    sq, sk = len(q_ids), len(kv_ids)
    if q_pos is None:
        return np.arange(sq) + sk - sq, np.arange(sk)
    return np.asarray(q_pos), np.asarray(kv_pos)


def _visible(q_ids, kv_ids, q_pos, kv_pos, causal, window_size):
    """The oracle: bool [sq, sk], as _tile_scores.TileScores.visible decides it."""
    same = (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] >= 0)
    return same & _in_band(*_coords(q_ids, kv_ids, q_pos, kv_pos), causal, window_size)


def _kernel_band(q_ids, kv_ids, q_pos, kv_pos, causal, window_size):
    """What the kernel applies element-wise: the global band, or nothing with positions."""
    if q_pos is not None:
        return np.ones((len(q_ids), len(kv_ids)), bool)
    return _in_band(*_coords(q_ids, kv_ids, None, None), causal, window_size)


def _hull(mask):
    hits = np.flatnonzero(mask)
    return (hits[0], hits[-1] + 1) if hits.size else (0, 0)


def _contiguous(ids, segment):
    hits = np.flatnonzero(ids == segment)
    return hits.size == 0 or hits[-1] - hits[0] + 1 == hits.size


def _check(q_ids, kv_ids, q_pos, kv_pos, causal, window_size, ranges=None):
    """Checks kernel_ranges' outputs on [b, s] inputs (computed here unless given as ranges)
    against the oracle, batch element by batch element."""
    row_ranges, key_ranges = ranges or kernel_ranges(
        jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32),
        None if q_pos is None else jnp.asarray(q_pos, jnp.int32),
        None if kv_pos is None else jnp.asarray(kv_pos, jnp.int32),
        causal=causal, window_size=window_size)
    assert row_ranges.dtype == key_ranges.dtype == jnp.int32
    assert row_ranges.shape == (*np.shape(q_ids), 4)
    assert key_ranges.shape == (*np.shape(kv_ids), 2)
    row_ranges, key_ranges = np.asarray(row_ranges), np.asarray(key_ranges)
    for b in range(len(q_ids)):
        qi, ki = np.asarray(q_ids[b]), np.asarray(kv_ids[b])
        qp = None if q_pos is None else np.asarray(q_pos[b])
        kp = None if kv_pos is None else np.asarray(kv_pos[b])
        visible = _visible(qi, ki, qp, kp, causal, window_size)
        kernel_band = _kernel_band(qi, ki, qp, kp, causal, window_size)
        for i, (lo, hi, exact, seg) in enumerate(row_ranges[b]):
            where = f"batch {b} row {i}: q_ids {qi.tolist()} kv_ids {ki.tolist()}"
            assert seg == qi[i], where
            # Every key the row sees lies in [lo, hi), where the band and the ids decide.
            assert not visible[i, :lo].any() and not visible[i, hi:].any(), where
            same = (ki[lo:hi] == qi[i]) & (qi[i] >= 0)
            np.testing.assert_array_equal(visible[i, lo:hi], kernel_band[i, lo:hi] & same, where)
            # Segments contiguous in kv (always so with positions) give the exact hull, with
            # exact = 1, the promise that lets the kernel skip the id comparison; others give
            # exact = 0 unless the range is empty.
            contiguous = qp is not None or _contiguous(ki, qi[i])
            assert exact == (1 if contiguous or lo == hi else 0), where
            if lo < hi:  # within the band and within the segment's extent in kv
                assert kernel_band[i, lo] and kernel_band[i, hi - 1], where
                hits = np.flatnonzero(ki == qi[i])
                assert hits.size and hits[0] <= lo and hi <= hits[-1] + 1, where
            if contiguous:
                assert (lo, hi) == _hull(visible[i]), where
                np.testing.assert_array_equal(visible[i, lo:hi], kernel_band[i, lo:hi], where)
            if qi[i] < 0:
                assert (lo, hi) == (0, 0), where
        for j, (qlo, qhi) in enumerate(key_ranges[b]):
            where = f"batch {b} key {j}: q_ids {qi.tolist()} kv_ids {ki.tolist()}"
            assert not visible[:qlo, j].any() and not visible[qhi:, j].any(), where
            if qp is not None or _contiguous(qi, ki[j]):
                assert (qlo, qhi) == _hull(visible[:, j]), where
            if ki[j] < 0:
                assert (qlo, qhi) == (0, 0), where


def _sorted_pack(rng, num_segments, lengths_from):
    """Ids of consecutive segments (gaps between ids allowed), some empty or one token long,
    then padding."""
    ids = np.cumsum(rng.integers(1, 3, num_segments))
    lengths = rng.choice(lengths_from, num_segments)
    row = np.repeat(ids, lengths)
    return np.concatenate([row, np.full(rng.integers(0, 4), -1)])


def _pad_batch(rows, width):
    """Rows padded with -1 to a fixed width, so that every case reuses one compilation."""
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])


@pytest.mark.parametrize("causal,window_size", OPTIONS)
def test_sorted_packs(causal, window_size):
    rng = np.random.default_rng(hash((causal, window_size)) % 2**32)
    for _ in range(4):
        n = int(rng.integers(1, 6))
        q_ids = _pad_batch([_sorted_pack(rng, n, [0, 1, 1, 2, 3, 5]) for _ in range(2)], Q_WIDTH)
        kv_ids = _pad_batch([_sorted_pack(rng, n, [0, 1, 2, 4, 7]) for _ in range(2)], K_WIDTH)
        _check(q_ids, kv_ids, None, None, causal, window_size)


@pytest.mark.parametrize("causal,window_size", OPTIONS)
def test_unsorted_noncontiguous_ids(causal, window_size):
    rng = np.random.default_rng(1 + hash((causal, window_size)) % 2**32)
    for sq, sk in [(Q_WIDTH, K_WIDTH), (K_WIDTH, Q_WIDTH)] * 2:
        alphabet = int(rng.integers(1, 5))
        q_ids = rng.integers(-1, alphabet, (2, sq))  # -1: padding anywhere
        kv_ids = rng.integers(-1, alphabet, (2, sk))
        _check(q_ids, kv_ids, None, None, causal, window_size)


def test_interleaved_segment_is_inexact():
    """ids [0, 1, 0]: query 0 of segment 0 sees keys 0 and 2, hull [0, 3), key 1 in between;
    segment 0 is not contiguous, so its rows are inexact even where the band leaves one key."""
    row_ranges, key_ranges = kernel_ranges(jnp.array([[0, 1, 0]]), jnp.array([[0, 1, 0]]),
                                           causal=False, window_size=(-1, -1))
    np.testing.assert_array_equal(row_ranges[0], [[0, 3, 0, 0], [1, 2, 1, 1], [0, 3, 0, 0]])
    np.testing.assert_array_equal(key_ranges[0], [[0, 3], [1, 2], [0, 3]])
    # Causal: query 0 sees only key 0.
    row_ranges, _ = kernel_ranges(jnp.array([[0, 1, 0]]), jnp.array([[0, 1, 0]]),
                                  causal=True, window_size=(-1, -1))
    np.testing.assert_array_equal(row_ranges[0], [[0, 1, 0, 0], [1, 2, 1, 1], [0, 3, 0, 0]])


def _random_cu_seqlens(rng, num_sequences):
    lengths = rng.choice([0, 0, 1, 2, 3, 5, 7], num_sequences)
    return np.concatenate([[0], np.cumsum(lengths)])


@pytest.mark.parametrize("causal,window_size", OPTIONS)
def test_varlen_layout(causal, window_size):
    rng = np.random.default_rng(2 + hash((causal, window_size)) % 2**32)
    for _ in range(4):
        layouts = []
        for _ in range(2):  # 5 sequences, some empty: a fixed shape, compiled once
            cu_q, cu_k = _random_cu_seqlens(rng, 5), _random_cu_seqlens(rng, 5)
            # Tokens past cu_seqlens[-1] are padding, as under jit.
            layouts.append((_sequence_layout(jnp.asarray(cu_q), Q_WIDTH),
                            _sequence_layout(jnp.asarray(cu_k), K_WIDTH)))
        (q_ids, q_pos), (kv_ids, kv_pos) = (
            [np.stack([layout[side][part] for layout in layouts]) for part in (0, 1)]
            for side in (0, 1))
        _check(q_ids, kv_ids, q_pos, kv_pos, causal, window_size)


def test_under_jit_many_tokens():
    """Thousands of tokens (many thread blocks, hash tables with collisions) under jit: a sorted
    pack in one row, ids drawn from a wide range with padding in the other."""
    rng = np.random.default_rng(3)
    sq, sk = 1500, 1300
    wide = rng.integers(0, 2**30, sq)
    wide[rng.random(sq) < 0.1] = -1  # padding
    q_ids = np.stack([np.sort(rng.integers(0, 40, sq)), wide])
    kv_ids = np.stack([np.sort(rng.integers(0, 40, sk)), rng.choice(wide, sk)])
    options = dict(causal=True, window_size=(300, -1))
    ranges = jax.jit(lambda q, k: kernel_ranges(q, k, **options))(q_ids, kv_ids)
    _check(q_ids, kv_ids, None, None, **options, ranges=ranges)


def test_windows_wider_than_int32():
    """Windows past 2^31 - 1 are unbounded in effect: the same ranges as -1."""
    rng = np.random.default_rng(4)
    q_ids, kv_ids = rng.integers(-1, 3, (2, Q_WIDTH)), rng.integers(-1, 3, (2, K_WIDTH))
    wide = kernel_ranges(q_ids, kv_ids, causal=False, window_size=(2**40, 2**33))
    unbounded = kernel_ranges(q_ids, kv_ids, causal=False, window_size=(-1, -1))
    for got, want in zip(wide, unbounded):
        np.testing.assert_array_equal(got, want)
    _check(q_ids, kv_ids, None, None, False, (-1, -1), ranges=wide)


def test_varlen_under_jit():
    """cu_seqlens traced, as flash_attention_varlen sees them under jit."""
    cu_q, cu_k = np.array([0, 3, 3, 4, 17, 23, 23]), np.array([0, 5, 9, 9, 12, 30, 30])
    options = dict(causal=True, window_size=(6, -1))

    @jax.jit
    def layout_and_ranges(cu_q, cu_k):
        layout = [x[None] for x in (*_sequence_layout(cu_q, Q_WIDTH),
                                    *_sequence_layout(cu_k, K_WIDTH))]
        q_ids, q_pos, kv_ids, kv_pos = layout
        return layout, kernel_ranges(q_ids, kv_ids, q_pos, kv_pos, **options)

    (q_ids, q_pos, kv_ids, kv_pos), (row_ranges, key_ranges) = layout_and_ranges(
        jnp.asarray(cu_q), jnp.asarray(cu_k))
    _check(*(np.asarray(x) for x in (q_ids, kv_ids, q_pos, kv_pos)), **options,
           ranges=(row_ranges, key_ranges))
    # Sequence 3 (queries 4..16, keys 9..11): causal hides queries 4..13, so key 9 is seen from
    # query 14 on, within its window of 6 keys.
    np.testing.assert_array_equal(key_ranges[0, 9], [14, 17])
    np.testing.assert_array_equal(row_ranges[0, 15], [9, 11, 1, 3])
