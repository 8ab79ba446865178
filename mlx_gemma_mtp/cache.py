"""The target's K/V caches, indexed by absolute position, that rewind exactly or raise.

The speculative loop appends `k + 1` positions per verify and then goes back to just after the
accepted ones, so every cache must be able to forget its newest entries exactly. mlx-lm's
`RotatingKVCache` cannot once its window has wrapped (its `trim` returns 0 and nobody checks);
ours keeps a linear buffer holding the window plus `room` extra positions, compacts it now and
then, and raises when a rewind would need a position it no longer holds.

Where the next write goes (`offset`) is either a Python int or a device scalar. A pipelined
speculative loop queues round r+1 before it has read how many drafts round r kept, so round
r+1 writes at a position the host does not know yet; the host knows bounds for it
(`low <= offset <= high`). Entries past `offset` are never erased, only overwritten or masked:
a query at position q sees keys at positions <= q (and > q - window when sliding), so stale
ones from rejected drafts are invisible. With an exact offset a single-token fetch is cut to
exactly the visible keys (no mask: the fast attention kernel); otherwise the fetch spans the
host-known range and a mask computed on the device picks the visible keys.

Both caches expose the interface mlx-lm's Gemma 4 attention calls (`offset`,
`update_and_fetch`) and, for the drafter, zero-copy views of what they hold (`view`): the whole
buffer and a mask of what the drafter sees, so a view's shape changes only when the buffer grows
or is compacted (the drafter's step is compiled, and traced again for each new shape).
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256  # positions added per buffer growth, as in mlx-lm's KVCache

Position = int | mx.array  # a host int, or a device int32 scalar


class CacheRewindError(RuntimeError):
    """A rewind that cannot be exact (the cache no longer holds what it would need)."""


def _copy_into(buffer: mx.array | None, like: mx.array, capacity: int) -> mx.array:
    """A zeroed buffer of `capacity` positions with `buffer`'s contents at the front."""
    B, H, _, D = like.shape
    fresh = mx.zeros((B, H, capacity, D), like.dtype)
    if buffer is not None and buffer.shape[2]:
        fresh[..., : buffer.shape[2], :] = buffer
    return fresh


def _write(buffer: mx.array, new: mx.array, index: Position) -> mx.array:
    """buffer with `new` written along axis 2 from `index` (host or device)."""
    if isinstance(index, int):
        buffer[..., index : index + new.shape[2], :] = new
        return buffer
    return mx.slice_update(buffer, new, mx.reshape(index, (1,)), axes=(2,))


def _additive(seen: mx.array, dtype) -> mx.array:
    """A boolean mask as the additive one (0 where seen, -inf elsewhere) in the attention's
    dtype. MLX CUDA's fused attention takes no boolean mask: it converts one at every call
    (three kernels per layer); converted here, once per forward (or drafting round), every
    layer of the kind shares it. Adding 0 leaves a score unchanged: the same result."""
    return mx.where(seen, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def _visible(queries: mx.array, first_key: int, last_key: int, window: int | None, dtype) -> mx.array:
    """[len(queries), last_key - first_key] additive mask: which keys (positions first_key ..
    last_key - 1) each query position sees: causal, and within `window` when sliding."""
    keys = mx.arange(first_key, last_key)[None]
    queries = queries[:, None]
    seen = keys <= queries
    if window is not None:
        seen = seen & (queries - keys < window)
    return _additive(seen, dtype)


class _Positions:
    """Where the next write goes: `offset`, with host bounds low <= offset <= high."""

    offset: Position
    low: int
    high: int

    @property
    def exact(self) -> bool:
        return isinstance(self.offset, int)

    def _advance(self, L: int) -> None:
        self.offset = self.offset + L
        self.low += L
        self.high += L

    def _queries(self, L: int) -> mx.array:
        """Positions of the next L queries, on the device."""
        return self.offset + mx.arange(L, dtype=mx.int32)

    def _check_seek(self, offset: Position, low: int | None, high: int | None) -> tuple[int, int]:
        if isinstance(offset, int):
            low = high = offset
        elif low is None or high is None:
            raise ValueError("a device offset needs host bounds low and high")
        if not 0 <= low <= high <= self.high:
            raise CacheRewindError(
                f"cannot move to positions {low}..{high}: the cache holds at most 0..{self.high - 1}"
            )
        return low, high

    def trim(self, n: int) -> int:
        """Forget the newest n positions (an exact cache only)."""
        if not self.exact:
            raise CacheRewindError("trim needs an exact offset; seek to an int first")
        self.seek(self.offset - n)
        return n


class FullCache(_Positions):
    """Every position since the start; rewinding only moves `offset` back."""

    def __init__(self):
        self.keys: mx.array | None = None  # [B, kv_heads, capacity, head_dim]; index = position
        self.values: mx.array | None = None
        self.offset: Position = 0  # the next write's position: 0 .. offset-1 are valid
        self.low = self.high = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        end = self.high + L  # no position at or past `end` is visible to these queries
        if self.keys is None or end > self.keys.shape[2]:
            capacity = (end + STEP - 1) // STEP * STEP
            held = None if self.keys is None else self.keys[..., : self.high, :]
            held_v = None if self.values is None else self.values[..., : self.high, :]
            self.keys = _copy_into(held, keys, capacity)
            self.values = _copy_into(held_v, values, capacity)
        self.keys = _write(self.keys, keys, self.offset)
        self.values = _write(self.values, values, self.offset)
        self._advance(L)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def mask(self, L: int, dtype):
        """Mask for the next L queries over the keys `update_and_fetch` returns for them
        (additive, in the attention's `dtype`, where it is an array)."""
        if self.exact:
            # mx.fast.scaled_dot_product_attention aligns "causal" to the last query.
            return "causal" if L > 1 else None
        return _visible(self._queries(L), 0, self.high + L, None, dtype)

    def seek(self, offset: Position, low: int | None = None, high: int | None = None) -> None:
        """Make `offset` the next write; positions before it must have been written."""
        self.low, self.high = self._check_seek(offset, low, high)
        self.offset = offset

    def view(self) -> tuple[mx.array, mx.array, mx.array]:
        """Keys, values (the whole buffer, no copy) and the mask of the positions before
        `offset` among them, as the drafter drafting at `offset` reads them."""
        seen = mx.arange(self.keys.shape[2])[None] < self.offset
        return self.keys, self.values, _additive(seen, self.keys.dtype)

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values] if self.keys is not None else []


class SlidingCache(_Positions):
    """The last `window + room` positions (at least), in a linear buffer.

    A target query at position q sees keys q-window+1 .. q. The drafter, drafting at position
    p, sees the `window + 1` positions p-window-1 .. p-1: transformers' bidirectional sliding
    mask is inclusive, |q - k| <= window (masking_utils.py, sliding_window_bidirectional_overlay,
    5.17). After a rewind of up to `room` positions the buffer still holds all of that.
    """

    def __init__(self, window: int, room: int):
        self.window = window
        self.room = room
        self.drafter_reach = window + 1  # positions the drafter's sliding layers read
        self.keys: mx.array | None = None  # [B, kv_heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.start = 0  # absolute position of buffer index 0
        self.offset: Position = 0  # the next write's position
        self.low = self.high = 0

    def _first_visible(self) -> int:
        """The lowest position the next queries may see."""
        return max(self.start, self.low - self.window + 1)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        first = self._first_visible()
        end = self.high + L
        if self.keys is None or end - self.start > self.keys.shape[2]:
            self._compact(keys, L)
        self.keys = _write(self.keys, keys, self.offset - self.start)
        self.values = _write(self.values, values, self.offset - self.start)
        self._advance(L)
        # Exact and L == 1: first .. end is exactly the window, so no mask is needed.
        fetched = slice(first - self.start, end - self.start)
        return self.keys[..., fetched, :], self.values[..., fetched, :]

    def _compact(self, like: mx.array, L: int) -> None:
        """Move what any later query or rewind may need to the front of a fresh buffer with
        room for L more positions: from `drafter_reach` before the lowest possible offset."""
        keep_from = max(self.start, self.low - self.drafter_reach)
        # Decoding (L <= room, high - low <= room) always compacts to the same capacity, so the
        # drafter's view keeps one shape and its compiled step one trace.
        capacity = max(self.high - keep_from, self.drafter_reach + self.room) + max(L, self.room) + STEP
        held = slice(keep_from - self.start, self.high - self.start)
        self.keys = _copy_into(None if self.keys is None else self.keys[..., held, :], like, capacity)
        self.values = _copy_into(None if self.values is None else self.values[..., held, :], like, capacity)
        self.start = keep_from

    def mask(self, L: int, dtype):
        """Mask for the next L queries over the keys `update_and_fetch` returns for them
        (additive, in the attention's `dtype`, where it is an array)."""
        if self.exact and L == 1:
            return None  # the fetch cuts the keys to exactly the window
        return _visible(self._queries(L), self._first_visible(), self.high + L, self.window, dtype)

    def seek(self, offset: Position, low: int | None = None, high: int | None = None) -> None:
        """Make `offset` the next write; raises if the buffer lost what reads from there need."""
        low, high = self._check_seek(offset, low, high)
        needed = max(low - self.drafter_reach, 0)
        if needed < self.start:
            raise CacheRewindError(
                f"sliding cache cannot move back to position {low}: it holds {self.start}..{self.high - 1} "
                f"and would need {needed}.. (window {self.window}, room {self.room})"
            )
        self.offset, self.low, self.high = offset, low, high

    def view(self) -> tuple[mx.array, mx.array, mx.array]:
        """Keys, values (the whole buffer, no copy) and the mask of the `window + 1` positions
        before `offset` among them, as the drafter drafting at `offset` reads them."""
        positions = self.start + mx.arange(self.keys.shape[2])[None]
        seen = (positions < self.offset) & (positions >= self.offset - self.drafter_reach)
        return self.keys, self.values, _additive(seen, self.keys.dtype)

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values] if self.keys is not None else []
