"""The target's K/V caches, indexed by absolute position, that rewind exactly or raise.

The speculative loop appends `k + 1` positions per verify and then rewinds the rejected tail,
so every cache must be able to forget its newest entries exactly. mlx-lm's `RotatingKVCache`
cannot once its window has wrapped (its `trim` returns 0 and nobody checks); ours keeps a
linear buffer holding the window plus `room` extra positions, compacts it now and then, and
raises when a rewind would need a position it no longer holds.

Both caches expose the interface mlx-lm's Gemma 4 attention calls (`offset`,
`update_and_fetch`) and, for the drafter, a zero-copy view of what they hold (`view`).
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256  # positions added per buffer growth, as in mlx-lm's KVCache


class CacheRewindError(RuntimeError):
    """A rewind that cannot be exact (the cache no longer holds what it would need)."""


def _grow(buffer: mx.array | None, like: mx.array, capacity: int) -> mx.array:
    """A buffer of `capacity` positions holding `buffer`'s contents at the front."""
    B, H, _, D = like.shape
    fresh = mx.zeros((B, H, capacity, D), like.dtype)
    if buffer is None:
        return fresh
    fresh[..., : buffer.shape[2], :] = buffer
    return fresh


class FullCache:
    """Every position since the start; rewinding only moves `offset` back."""

    def __init__(self):
        self.keys: mx.array | None = None  # [B, kv_heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.offset = 0  # positions held: 0 .. offset-1

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            capacity = (end + STEP - 1) // STEP * STEP
            held = None if self.keys is None else self.keys[..., : self.offset, :]
            held_v = None if self.values is None else self.values[..., : self.offset, :]
            self.keys = _grow(held, keys, capacity)
            self.values = _grow(held_v, values, capacity)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def mask(self, L: int):
        """Mask for the next L queries."""
        # mx.fast.scaled_dot_product_attention aligns "causal" to the last query.
        return "causal" if L > 1 else None

    def trim(self, n: int) -> int:
        if not 0 <= n <= self.offset:
            raise CacheRewindError(f"cannot rewind {n} of {self.offset} positions")
        self.offset -= n
        return n

    def view(self) -> tuple[mx.array, mx.array]:
        """Keys and values of every held position (slices of the buffer, no copy)."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values] if self.keys is not None else []


class SlidingCache:
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
        self.keep = self.drafter_reach + room  # positions kept when the buffer is compacted
        self.keys: mx.array | None = None  # [B, kv_heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.start = 0  # absolute position of buffer index 0
        self.offset = 0  # positions seen: the buffer holds start .. offset-1

    @property
    def held(self) -> int:
        return self.offset - self.start

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        first_needed = max(self.start, self.offset - self.window + 1)
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self.held + L <= capacity:
            self.keys[..., self.held : self.held + L, :] = keys
            self.values[..., self.held : self.held + L, :] = values
            self.offset += L
            begin = first_needed - self.start
            return self.keys[..., begin : self.held, :], self.values[..., begin : self.held, :]
        # Does not fit: attend over old + new, then keep only the tail in a fresh buffer.
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys[..., : self.held, :], keys], axis=2)
            all_v = mx.concatenate([self.values[..., : self.held, :], values], axis=2)
        begin = first_needed - self.start
        fetched = all_k[..., begin:, :], all_v[..., begin:, :]
        self.offset += L
        kept = min(all_k.shape[2], self.keep)
        self.start = self.offset - kept
        self.keys = _grow(all_k[..., -kept:, :], keys, self.keep + STEP)
        self.values = _grow(all_v[..., -kept:, :], values, self.keep + STEP)
        return fetched

    def mask(self, L: int):
        """Mask for the next L queries (positions offset .. offset+L-1), over the keys
        that `update_and_fetch` will return for them."""
        if L == 1:
            return None  # the fetch cuts the keys to exactly the window
        first_key = max(self.start, self.offset - self.window + 1)
        q = mx.arange(self.offset, self.offset + L)[:, None]
        k = mx.arange(first_key, self.offset + L)[None]
        return (k <= q) & (q - k < self.window)

    def trim(self, n: int) -> int:
        new_offset = self.offset - n
        needed = max(new_offset - self.drafter_reach, 0)
        if n < 0 or new_offset < self.start or needed < self.start:
            raise CacheRewindError(
                f"sliding cache cannot rewind {n} positions: it holds {self.start}..{self.offset - 1} "
                f"and after the rewind it would need {needed}.. (window {self.window}, room {self.room})"
            )
        self.offset = new_offset
        return n

    def view(self) -> tuple[mx.array, mx.array]:
        """Keys and values of the last `window + 1` positions (slices of the buffer, no copy)."""
        begin = max(self.held - self.drafter_reach, 0)
        return self.keys[..., begin : self.held, :], self.values[..., begin : self.held, :]

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values] if self.keys is not None else []
