"""Caches rewind exactly or raise, and hand the drafter views of their own buffers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp.cache import STEP, CacheRewindError, FullCache, SlidingCache

WINDOW, ROOM = 8, 4


def _kv(start: int, n: int) -> tuple[mx.array, mx.array]:
    """Keys whose value is their absolute position: [1, 1, n, 2]."""
    pos = mx.arange(start, start + n, dtype=mx.float32)
    k = mx.broadcast_to(pos[None, None, :, None], (1, 1, n, 2))
    return k, -k


def _positions(keys: mx.array) -> list[int]:
    return np.array(keys)[0, 0, :, 0].astype(int).tolist()


def _seen(view) -> list[int]:
    """Positions of the keys a view's mask lets the drafter see (additive: 0 seen, -inf not)."""
    keys, _, mask = view
    return [p for p, m in zip(_positions(keys), np.array(mask)[0]) if m == 0]


@pytest.mark.parametrize("chunks", [[1] * 40, [5, 3, 12, 1, 1, 9, 30], [40]])
def test_sliding_fetch_and_mask_match_the_window(chunks):
    cache = SlidingCache(WINDOW, ROOM)
    for n in chunks:
        first = cache.offset
        mask = cache.mask(n, mx.float32)
        keys, values = cache.update_and_fetch(*_kv(first, n))
        got = _positions(keys)
        assert got[-1] == first + n - 1 and got == list(range(got[0], got[-1] + 1))
        assert np.array_equal(np.array(values), -np.array(keys))
        for qi, q in enumerate(range(first, first + n)):
            visible = {k for ki, k in enumerate(got) if mask is None or np.array(mask)[qi, ki] == 0}
            assert visible == set(range(max(q - WINDOW + 1, 0), q + 1)), (q, sorted(visible))


def test_sliding_rewind_is_exact_within_room_and_raises_beyond():
    cache = SlidingCache(WINDOW, ROOM)
    for _ in range(50):
        cache.update_and_fetch(*_kv(cache.offset, 1))
    cache.update_and_fetch(*_kv(cache.offset, ROOM + 1))  # a verify of ROOM + 1 positions
    cache.trim(ROOM)
    assert cache.offset == 51
    assert _seen(cache.view()) == list(range(51 - WINDOW - 1, 51))  # the drafter's window + 1
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
    assert _seen(cache.view()) == list(range(303))
    with pytest.raises(CacheRewindError):
        cache.trim(304)


def test_views_share_the_cache_buffer():
    """The drafter's K/V are the cache's own buffers: evaluating them allocates nothing."""
    for cache in (FullCache(), SlidingCache(512, 16)):
        k = mx.random.normal((1, 4, 1000, 256))
        cache.update_and_fetch(k, k + 1)
        mx.eval(cache.state)
        before = mx.get_active_memory()
        keys, values, mask = cache.view()
        mx.eval(keys, values)
        assert mx.get_active_memory() - before < 4096, "view copied the buffer"
        assert len(_seen((keys, values, mask))) == (1000 if isinstance(cache, FullCache) else 513)


@pytest.mark.parametrize("make", [FullCache, lambda: SlidingCache(WINDOW, ROOM)], ids=["full", "sliding"])
def test_views_change_shape_only_when_the_buffer_grows(make):
    """The drafter's step is compiled per view shape: decoding must not give it a new shape
    every round. Full: a new one per STEP positions; sliding: one, once decoding compacts."""
    rng = np.random.RandomState(1)
    cache = make()
    cache.update_and_fetch(*_kv(0, 40))  # a prompt
    shapes = []
    for _ in range(700):
        k = rng.randint(0, ROOM)  # a round: verify k + 1, keep some
        cache.update_and_fetch(*_kv(cache.offset, k + 1))
        cache.trim(rng.randint(0, k + 1))
        shapes.append(cache.view()[0].shape[2])
    changes = sum(a != b for a, b in zip(shapes, shapes[1:]))
    if isinstance(cache, FullCache):
        assert shapes[-1] % STEP == 0 and cache.offset <= shapes[-1] < cache.offset + STEP + ROOM
        assert changes <= shapes[-1] // STEP
    else:
        assert changes <= 1 and cache.start > 0


def _round_keys(start: int, n: int, round_id: int) -> tuple[mx.array, mx.array]:
    """Keys position + round_id / 1000: which write a read came from shows in the fraction."""
    k, v = _kv(start, n)
    return k + round_id / 1000, v - round_id / 1000


@pytest.mark.parametrize("make", [FullCache, lambda: SlidingCache(WINDOW, ROOM)], ids=["full", "sliding"])
def test_device_positions_read_exactly_what_exact_ones_would(make):
    """Rounds queued before the previous one is read back: the cache writes at a device
    position the host only bounds. Every query and every drafter view must see exactly the
    positions it would with an exact offset, each from its latest write, never a stale one."""
    rng = np.random.RandomState(0)
    cache = make()
    window = getattr(cache, "window", None)
    reach = getattr(cache, "drafter_reach", None)
    written = {}  # position -> round id of its latest write
    cache.update_and_fetch(*_round_keys(0, 30, 0))
    written.update({p: 0 for p in range(30)})
    truth, low, high = 30, 30, 30
    for round_id in range(1, 300):
        keys, _, mask = cache.view()  # the drafter, drafting at `truth`
        seen = [k for i, k in enumerate(np.array(keys)[0, 0, :, 0]) if np.array(mask)[0, i] == 0]
        expected = range(0 if reach is None else max(truth - reach, 0), truth)
        assert [round(k * 1000) for k in seen] == [p * 1000 + written[p] for p in expected], round_id
        k = rng.randint(1, ROOM)  # a verify of k + 1 positions
        mask = cache.mask(k + 1, mx.float32)
        keys, _ = cache.update_and_fetch(*_round_keys(truth, k + 1, round_id))
        written.update({p: round_id for p in range(truth, truth + k + 1)})
        for qi, q in enumerate(range(truth, truth + k + 1)):
            visible = np.array(keys)[0, 0, :, 0]
            if not isinstance(mask, str) and mask is not None:
                visible = visible[np.array(mask)[qi] == 0]  # additive: 0 seen, -inf not
            elif mask == "causal":
                visible = visible[: len(visible) - k + qi]
            expected = range(0 if window is None else max(q - window + 1, 0), q + 1)
            assert [round(v * 1000) for v in visible] == [p * 1000 + written[p] for p in expected], (round_id, q)
        m = rng.randint(0, k + 1)  # drafts kept: the next round starts after them and a bonus
        truth, low, high = truth + m + 1, low + 1, high + k + 1
        if rng.random_sample() < 0.3:  # the host read the round back
            low = high = truth
            cache.seek(truth)
        else:
            cache.seek(mx.array(truth, dtype=mx.int32), low, high)
    if window is not None:
        assert cache.start > 0, "the buffer never compacted"


def test_seek_refuses_what_it_cannot_honour():
    full, sliding = FullCache(), SlidingCache(WINDOW, ROOM)
    for cache in (full, sliding):
        cache.update_and_fetch(*_kv(0, 20))
        with pytest.raises(CacheRewindError):
            cache.seek(21)  # past what was written
        with pytest.raises(ValueError, match="bounds"):
            cache.seek(mx.array(18))  # a device position without host bounds
        with pytest.raises(CacheRewindError):
            cache.seek(mx.array(18), 17, 25)
        cache.seek(mx.array(18), 17, 19)
        with pytest.raises(CacheRewindError, match="exact"):
            cache.trim(1)
    for _ in range(600):
        sliding.seek(sliding.high)
        sliding.update_and_fetch(*_kv(sliding.offset, 1))
    with pytest.raises(CacheRewindError):
        sliding.seek(mx.array(sliding.start + 2), sliding.start + 2, sliding.high)
