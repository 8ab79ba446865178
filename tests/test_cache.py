"""The batch cache: every row at its own position, rewinds exact or refused, the drafter's views."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp.cache import ROOM, STEP, Cache, CacheRewindError, ring_positions

WINDOW = 8
KINDS = ["sliding_attention", "full_attention"]


def _kv(starts: list[int], n: int) -> tuple[mx.array, mx.array]:
    """Keys whose value is their row's absolute position: [B, 1, n, 2]."""
    pos = mx.array(starts, dtype=mx.float32)[:, None] + mx.arange(n, dtype=mx.float32)
    k = mx.broadcast_to(pos[:, None, :, None], (len(starts), 1, n, 2))
    return k, -k


def _forward(cache: Cache, n: int, starts: list[int]):
    """What one forward of n tokens per row does to the cache: (masks, {kind: fetched keys})."""
    masks = cache.begin(n, mx.float32)
    fetched = {}
    for kind, layer in zip(cache.kinds, cache.layers):
        keys, values = layer.update_and_fetch(*_kv(starts, n))
        assert np.array_equal(np.array(values), -np.array(keys))
        fetched[kind] = keys
    cache.advance(n)
    return masks, fetched


def _visible(keys: mx.array, mask, row: int, query: int, n: int = 1) -> set[int]:
    """Positions a query (index within a forward of n tokens) of a row sees among the fetched keys."""
    positions = np.array(keys)[row, 0, :, 0].astype(int)
    if mask is None:
        return set(positions.tolist())
    if isinstance(mask, str):  # "causal", aligned to the keys' end
        return set(positions[: len(positions) - n + query + 1].tolist())
    seen = np.array(mask)[row, 0, query] == 0
    return set(positions[seen].tolist())


def _check_window(masks, fetched, starts: list[int], n: int) -> None:
    for row, first in enumerate(starts):
        for i, q in enumerate(range(first, first + n)):
            seen = _visible(fetched["sliding_attention"], masks["sliding_attention"], row, i, n)
            assert seen == set(range(max(q - WINDOW + 1, 0), q + 1)), (row, q, sorted(seen))
            full_mask = masks["full_attention"]
            if isinstance(full_mask, str) or full_mask is None:
                keys = np.array(fetched["full_attention"])[row, 0, :, 0].astype(int)
                assert keys.tolist() == list(range(first + n)) and (full_mask == "causal") == (n > 1)
            else:
                assert _visible(fetched["full_attention"], full_mask, row, i) == set(range(q + 1))


@pytest.mark.parametrize("chunks", [[1] * 40, [5, 3, 12, 1, 1, 9, 30], [40]])
def test_one_row_sees_exactly_its_window(chunks):
    cache = Cache(KINDS, WINDOW)
    at = 0
    for n in chunks:
        masks, fetched = _forward(cache, n, [at])
        _check_window(masks, fetched, [at], n)
        at += n
    assert cache.positions.low == [at] and cache.positions.exact


def test_rows_at_different_positions_each_see_their_own_window():
    rows = [Cache(KINDS, WINDOW) for _ in range(3)]
    starts = [37, 3, 15]
    for cache, n in zip(rows, starts):
        _forward(cache, n, [0])
    cache = Cache.join(rows)
    assert cache.positions.shared is None
    for n in (1, 3, ROOM, 1, 1, 5):
        masks, fetched = _forward(cache, n, starts)
        _check_window(masks, fetched, starts, n)
        starts = [s + n for s in starts]


def _drafter_sees(cache: Cache, row: int) -> dict[str, list[int]]:
    views = cache.views({"sliding_attention": 0, "full_attention": 1}, mx.float32)
    out = {}
    for kind, (keys, _, mask) in views.items():
        seen = np.array(mask)[row, 0, 0] == 0
        out[kind] = sorted(np.array(keys)[row, 0, seen, 0].astype(int).tolist())
    return out


def test_ragged_rewinds_are_exact_per_row_past_the_window():
    """Every row verifies ROOM positions and keeps a different number of them: each then sees
    only what it kept, as the drafter and as the next verify, however far past the window."""
    rows = [Cache(KINDS, WINDOW) for _ in range(3)]
    for cache, n in zip(rows, (50, 9, 200)):
        _forward(cache, n, [0])
    cache = Cache.join(rows)
    at = [50, 9, 200]
    for kept in ([0, 5, 16], [16, 0, 3], [2, 2, 2]):
        _forward(cache, ROOM, at)
        at = [a + m + 1 for a, m in zip(at, kept)]
        cache.seek(mx.array(at, dtype=mx.int32), at, at)  # a device offset the host knows
        for row, p in enumerate(at):
            assert _drafter_sees(cache, row) == {
                "sliding_attention": list(range(p - WINDOW - 1, p)),  # window + 1, inclusive
                "full_attention": list(range(p)),
            }
        masks, fetched = _forward(cache, 1, at)
        _check_window(masks, fetched, at, 1)
        at = [a + 1 for a in at]


def test_device_positions_read_what_host_positions_would():
    """A round queued before the host knows where rows stand (low <= offset <= high) writes and
    sees exactly what it would with the positions known."""

    def run(host: bool):
        cache = Cache(KINDS, WINDOW)
        _forward(cache, 30, [0])
        _forward(cache, 5, [30])  # a verify of 5; it keeps 2
        if host:
            cache.seek([33])
        else:
            cache.seek(mx.array([33], dtype=mx.int32), [31], [35])
        masks, fetched = _forward(cache, 4, [33])
        return [np.array(m) for m in (masks["sliding_attention"],)], fetched

    (exact_mask,), exact = run(True)
    (device_mask,), device = run(False)
    for kind in KINDS:
        keys_e, keys_d = np.array(exact[kind])[0, 0, :, 0], np.array(device[kind])[0, 0, :, 0]
        n = min(len(keys_e), len(keys_d))
        assert np.array_equal(keys_e[:n], keys_d[:n])
    # The device round reads up to its host bound (high): its extra slots are all masked.
    n = exact_mask.shape[-1]
    assert np.array_equal(exact_mask, device_mask[..., :n]) and np.all(device_mask[..., n:] == -np.inf)


def test_rewinds_past_what_is_held_raise():
    cache = Cache(KINDS, WINDOW)
    _forward(cache, 250, [0])
    _forward(cache, 250, [250])
    with pytest.raises(CacheRewindError, match="sliding cache cannot move row 0 back to position 100"):
        cache.rewind(400)  # the ring holds only its capacity's newest positions
    cache.rewind(5)  # within what the ring keeps: fine
    assert cache.positions.low == [495]
    with pytest.raises(CacheRewindError, match="cannot move to positions 496..496"):
        cache.seek([496])  # past what was written since the rewind's target
    with pytest.raises(ValueError, match="host bounds"):
        cache.seek(mx.array([90]))
    full_only = Cache(["full_attention"], WINDOW)
    _forward(full_only, 100, [0])
    full_only.rewind(90)  # a full cache holds every position
    assert _forward(full_only, 1, [10])[1]["full_attention"].shape[2] == 11


def test_views_are_the_buffers_and_change_shape_only_when_a_full_buffer_grows():
    cache = Cache(KINDS, WINDOW)
    shapes = set()
    for _ in range(3 * STEP):
        _forward(cache, 1, cache.positions.low)
        views = cache.views({"sliding_attention": 0, "full_attention": 1}, mx.float32)
        assert all(views[k][0] is layer.keys for k, layer in zip(KINDS, cache.layers))
        shapes.add(tuple(views[k][0].shape[2] for k in KINDS))
    capacity = cache.capacity
    assert shapes == {(capacity, STEP), (capacity, 2 * STEP), (capacity, 3 * STEP)}


def test_take_and_join_keep_each_row():
    rows = [Cache(KINDS, WINDOW) for _ in range(3)]
    for cache, n in zip(rows, (12, 250, 5)):
        _forward(cache, n, [0])
    joined = Cache.join(rows)
    back = joined.take([2, 0])
    assert back.positions.low == [5, 12]
    for i, original in zip((0, 1), (rows[2], rows[0])):
        for mine, theirs in zip(back.layers, original.layers):
            n = theirs.keys.shape[2]
            assert np.array_equal(np.array(mine.keys[i : i + 1, :, :n]), np.array(theirs.keys))


def test_ring_positions_map_each_slot_to_its_newest_position():
    held = np.array(ring_positions(mx.array([3, 10, 25]), 8))
    assert held[0].tolist() == [0, 1, 2, -5, -4, -3, -2, -1]
    assert held[1].tolist() == [8, 9, 2, 3, 4, 5, 6, 7]
    assert held[2].tolist() == [24, 17, 18, 19, 20, 21, 22, 23]


def test_sliding_reads_what_the_context_holds_until_the_ring_wraps():
    """Before any row wrote past the ring's end a forward reads only the slots written so far
    (unmasked while one row is inside its window); after, the whole ring."""
    cache = Cache(KINDS, WINDOW)
    masks, fetched = _forward(cache, 1, [0])
    assert fetched["sliding_attention"].shape[2] == 1 and masks["sliding_attention"] is None
    masks, fetched = _forward(cache, 3, [1])
    assert fetched["sliding_attention"].shape[2] == 4 and masks["sliding_attention"] == "causal"
    masks, fetched = _forward(cache, 10, [4])  # past the window: a mask over the 14 slots
    assert fetched["sliding_attention"].shape[2] == 14 and masks["sliding_attention"].shape[-1] == 14
    at = 14
    while at + 256 <= cache.capacity:
        _forward(cache, 256, [at])
        at += 256
    masks, fetched = _forward(cache, cache.capacity - at + 1, [at])  # writes past the end
    assert fetched["sliding_attention"].shape[2] == cache.capacity
    _check_window(masks, fetched, [at], cache.capacity - at + 1)
