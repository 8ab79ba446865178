"""Caches rewind exactly or raise, and hand the drafter views of their own buffers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp.cache import CacheRewindError, FullCache, SlidingCache

WINDOW, ROOM = 8, 4


def _kv(start: int, n: int) -> tuple[mx.array, mx.array]:
    """Keys whose value is their absolute position: [1, 1, n, 2]."""
    pos = mx.arange(start, start + n, dtype=mx.float32)
    k = mx.broadcast_to(pos[None, None, :, None], (1, 1, n, 2))
    return k, -k


def _positions(keys: mx.array) -> list[int]:
    return np.array(keys)[0, 0, :, 0].astype(int).tolist()


@pytest.mark.parametrize("chunks", [[1] * 40, [5, 3, 12, 1, 1, 9, 30], [40]])
def test_sliding_fetch_and_mask_match_the_window(chunks):
    cache = SlidingCache(WINDOW, ROOM)
    for n in chunks:
        first = cache.offset
        mask = cache.mask(n)
        keys, values = cache.update_and_fetch(*_kv(first, n))
        got = _positions(keys)
        assert got[-1] == first + n - 1 and got == list(range(got[0], got[-1] + 1))
        assert np.array_equal(np.array(values), -np.array(keys))
        for qi, q in enumerate(range(first, first + n)):
            visible = {k for ki, k in enumerate(got) if mask is None or bool(np.array(mask)[qi, ki])}
            assert visible == set(range(max(q - WINDOW + 1, 0), q + 1)), (q, sorted(visible))


def test_sliding_rewind_is_exact_within_room_and_raises_beyond():
    cache = SlidingCache(WINDOW, ROOM)
    for _ in range(50):
        cache.update_and_fetch(*_kv(cache.offset, 1))
    cache.update_and_fetch(*_kv(cache.offset, ROOM + 1))  # a verify of ROOM + 1 positions
    cache.trim(ROOM)
    assert cache.offset == 51
    keys, _ = cache.view()
    assert _positions(keys) == list(range(51 - WINDOW - 1, 51))  # the drafter's window + 1
    # Continue after the rewind: the fetched window is the right one, the stale tail is gone.
    keys, _ = cache.update_and_fetch(*_kv(51, 1))
    assert _positions(keys) == list(range(51 - WINDOW + 1, 52))
    # Past the compactions, rewinding further than what is kept must raise, not half-succeed.
    for _ in range(600):
        cache.update_and_fetch(*_kv(cache.offset, 1))
    assert cache.start > 0
    with pytest.raises(CacheRewindError):
        for _ in range(600):
            cache.trim(1)
    assert cache.offset == cache.start + WINDOW + 1  # the last exact rewind, and no further
    keys, _ = cache.update_and_fetch(*_kv(cache.offset, 1))
    assert _positions(keys) == list(range(cache.offset - WINDOW, cache.offset))


def test_full_rewind_and_view():
    cache = FullCache()
    for n in (300, 7, 1):
        cache.update_and_fetch(*_kv(cache.offset, n))
    cache.trim(5)
    keys, _ = cache.view()
    assert _positions(keys) == list(range(303))
    with pytest.raises(CacheRewindError):
        cache.trim(304)


def test_views_share_the_cache_buffer():
    """The drafter's K/V are slices of the cache: evaluating them allocates nothing."""
    for cache in (FullCache(), SlidingCache(512, 16)):
        k = mx.random.normal((1, 4, 1000, 256))
        cache.update_and_fetch(k, k + 1)
        mx.eval(cache.state)
        before = mx.get_active_memory()
        keys, values = cache.view()
        mx.eval(keys, values)
        assert mx.get_active_memory() - before < 4096, "view copied the buffer"
        assert keys.shape[2] == (1000 if isinstance(cache, FullCache) else 513)
