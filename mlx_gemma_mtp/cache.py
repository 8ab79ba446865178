"""The target's K/V cache for a batch of sequences: one positions record, every layer's buffers.

Each row (sequence) has its own position: where its next K/V goes, and the position RoPE gives
its next token. The speculative loop appends k + 1 positions per row and per verify and then
moves each row back to just after what that row kept, so rows stay ragged and exact: no RoPE
holes, and no key of a rejected draft is ever visible (entries past a row's position are
never erased, only overwritten or masked).

`Positions` is that record, held once for all layers: a device vector `offset` [B] (a pipelined
loop queues round r+1 before it has read how many drafts round r kept, so the next write is
known on the device only) and host bounds `low[b] <= offset[b] <= high[b]`. While every row's
position is known on the host and the same (B = 1 outside a pipelined round, a prefill), writes
are slices and full-attention layers need no mask.

Full-attention layers keep a linear buffer indexed by position. Sliding layers keep a ring of
`capacity` slots (slot = position mod capacity), large enough that a write never clobbers a key
a query, the drafter or a rewind still needs, and that a stale key from a rejected draft lands
outside every window: one shape for the whole generation (the drafter's step is compiled and
traced once per view shape).

Layers reach their buffers through mlx-lm's attention interface (`offset`, `update_and_fetch`);
the drafter reads them in place (`Cache.views`), masked as it sees them.
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256  # positions added per growth of a full layer's buffer, as in mlx-lm's KVCache
MAX_WRITE = 256  # most positions one forward may append (prefill goes in chunks of this)
ROOM = 17  # how far back a rewind may go: the longest verify (MAX_DRAFT + 1 positions)


class CacheRewindError(RuntimeError):
    """A move that cannot be exact (the cache no longer holds what it would need)."""


def _additive(seen: mx.array, dtype) -> mx.array:
    """A boolean mask as the additive one (0 where seen, -inf elsewhere) in the attention's
    dtype: MLX CUDA's fused attention converts a boolean mask at every layer; this is built
    once per forward and shared."""
    return mx.where(seen, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


class Positions:
    """Where each row's next write goes: `offset` [B] int32 on the device, with host bounds
    low[b] <= offset[b] <= high[b], and `written[b]`: one past the highest position the row
    may have written (the sliding ring checks rewinds against it)."""

    def __init__(self, offsets: list[int]):
        self.offset = mx.array(offsets, dtype=mx.int32)
        self.low, self.high, self.written = list(offsets), list(offsets), list(offsets)
        self.sliding_keys = 0  # sliding-ring slots the coming forward reads (`Cache.begin` sets it)
        # Where the coming forward's L tokens go, [B, 1, L, 1], in a full layer's buffer and in a
        # sliding ring (`Cache.begin` sets them: built once a forward, not once a layer)
        self.write_slots: mx.array | None = None
        self.ring_slots: mx.array | None = None

    @property
    def rows(self) -> int:
        return len(self.low)

    @property
    def exact(self) -> bool:
        return self.low == self.high

    @property
    def shared(self) -> int | None:
        """The host position every row is at, when there is one."""
        first = self.low[0]
        return first if self.exact and all(p == first for p in self.low) else None

    def queries(self, L: int) -> mx.array:
        """[B, L] the positions of each row's next L tokens."""
        return self.offset[:, None] + mx.arange(L, dtype=mx.int32)

    def advance(self, L: int) -> None:
        self.written = [max(w, h + L) for w, h in zip(self.written, self.high)]
        self.offset = self.offset + L
        self.low = [p + L for p in self.low]
        self.high = [p + L for p in self.high]


class FullLayer:
    """Every position since the start, indexed by position: [B, kv_heads, capacity, head_dim]."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self):
        """What mlx-lm's attention hands RoPE: a host int or each row's device position."""
        shared = self.positions.shared
        return self.positions.offset if shared is None else shared

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        p, L = self.positions, keys.shape[2]
        end = max(p.high) + L  # no row's query sees a position at or past this
        if self.keys is None or end > self.keys.shape[2]:
            capacity = -(-end // STEP) * STEP
            self.keys = _grown(self.keys, keys, capacity, max(p.high))
            self.values = _grown(self.values, values, capacity, max(p.high))
        at = p.shared
        if at is not None:
            self.keys[..., at : at + L, :] = keys
            self.values[..., at : at + L, :] = values
        else:
            self.keys = mx.put_along_axis(self.keys, p.write_slots, keys, axis=2)
            self.values = mx.put_along_axis(self.values, p.write_slots, values, axis=2)
        return self.keys[..., :end, :], self.values[..., :end, :]


def _grown(buffer: mx.array | None, like: mx.array, capacity: int, held: int) -> mx.array:
    """A zeroed [B, H, capacity, D] buffer with `buffer`'s first `held` positions."""
    B, H, _, D = like.shape
    fresh = mx.zeros((B, H, capacity, D), like.dtype)
    if buffer is not None and held:
        fresh[..., :held, :] = buffer[..., :held, :]
    return fresh


class SlidingLayer:
    """The newest positions of each row in a ring of `capacity` slots (slot = position mod
    capacity): [B, kv_heads, capacity, head_dim]."""

    def __init__(self, positions: Positions, capacity: int):
        self.positions = positions
        self.capacity = capacity
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    offset = FullLayer.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        p, L = self.positions, keys.shape[2]
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, self.capacity, D), keys.dtype)
            self.values = mx.zeros((B, H, self.capacity, D), values.dtype)
        at = p.shared
        if at is not None and at % self.capacity + L <= self.capacity:
            start = at % self.capacity
            self.keys[..., start : start + L, :] = keys
            self.values[..., start : start + L, :] = values
        else:
            self.keys = mx.put_along_axis(self.keys, p.ring_slots, keys, axis=2)
            self.values = mx.put_along_axis(self.values, p.ring_slots, values, axis=2)
        return self.keys[..., : p.sliding_keys, :], self.values[..., : p.sliding_keys, :]


def ring_read(p: Positions, L: int, capacity: int) -> int:
    """The ring slots a forward of L tokens reads: until some row has written past the ring's
    end, the first max(high) + L (later slots hold nothing or stale keys); then all of them.
    Attention over a short context then costs what the context holds, not the whole ring."""
    end = max(p.high) + L
    return end if end <= capacity and max(p.written) <= capacity else capacity


def ring_positions(ends: mx.array, capacity: int, slots: int | None = None) -> mx.array:
    """[B, slots] the position each of the first `slots` (default: all) slots holds, for rows
    whose newest written position is ends - 1 ([B]): the latest position <= ends - 1 congruent
    to the slot (negative: none yet). A stale key of a rejected draft (past ends - 1) maps
    `capacity` positions back, outside every window."""
    slots = mx.arange(capacity if slots is None else slots, dtype=mx.int32)[None]
    last = ends[:, None] - 1
    return last - mx.remainder(last - slots, capacity)


class Cache:
    """One batch's K/V: a layer cache for every target layer that computes K/V, and the rows'
    one `Positions`.

    `window` and `kinds`: the sliding window and each layer's attention type; sliding rings
    hold window + MAX_WRITE + ROOM positions and a little slack.
    """

    def __init__(self, kinds: list[str], window: int, offsets: list[int] | None = None):
        self.kinds = kinds
        self.window = window
        self.capacity = -(-(window + MAX_WRITE + ROOM + 4) // 64) * 64
        self.positions = Positions(offsets or [0])
        self.layers = [self._layer(kind) for kind in kinds]

    def _layer(self, kind: str) -> FullLayer | SlidingLayer:
        if kind == "full_attention":
            return FullLayer(self.positions)
        return SlidingLayer(self.positions, self.capacity)

    @property
    def rows(self) -> int:
        return self.positions.rows

    @property
    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in (layer.keys, layer.values) if a is not None]

    # ----------------------------------------------------------------------------------------
    # A forward

    def begin(self, L: int, dtype) -> dict[str, mx.array | str | None]:
        """The masks of a forward of L tokens per row, per attention type (additive, in `dtype`),
        over the keys the layers' `update_and_fetch` will return."""
        if L > MAX_WRITE:
            raise ValueError(f"a forward appends at most {MAX_WRITE} positions, got {L}")
        p = self.positions
        queries = p.write_slots = p.queries(L)[:, None, :, None]  # [B, 1, L, 1]
        p.ring_slots = queries % self.capacity if "sliding_attention" in self.kinds else None
        masks = {}
        if "full_attention" in self.kinds:
            if p.shared is not None:  # keys are exactly 0 .. position + L - 1
                masks["full_attention"] = "causal" if L > 1 else None
            else:
                keys = mx.arange(max(p.high) + L, dtype=mx.int32)[None, None, None]
                masks["full_attention"] = _additive(keys <= queries, dtype)
        if "sliding_attention" in self.kinds:
            end = p.sliding_keys = ring_read(p, L, self.capacity)  # the layers' keys and this mask alike
            if p.shared is not None and end == p.shared + L <= self.window:
                masks["sliding_attention"] = "causal" if L > 1 else None  # slots 0.. hold positions 0..
            else:
                held = ring_positions(p.offset + L, self.capacity, end)[:, None, None, :]
                seen = (held >= 0) & (held <= queries) & (queries - held < self.window)
                masks["sliding_attention"] = _additive(seen, dtype)
        return masks

    def advance(self, L: int) -> None:
        """After a forward of L tokens per row."""
        self.positions.advance(L)

    # ----------------------------------------------------------------------------------------
    # Moving rows

    def seek(self, offset: mx.array | list[int], low: list[int] | None = None, high: list[int] | None = None):
        """Make `offset` each row's next write: host ints, or a device vector [B] with host
        bounds. Positions before it must have been written and still be held."""
        if not isinstance(offset, mx.array):
            low = high = list(offset)
            offset = mx.array(low, dtype=mx.int32)
        elif low is None or high is None:
            raise ValueError("a device offset needs host bounds low and high")
        p = self.positions
        for row, (lo, hi) in enumerate(zip(low, high)):
            self._check(row, lo, hi)
        p.offset, p.low, p.high = offset, list(low), list(high)

    def _check(self, row: int, low: int, high: int) -> None:
        p = self.positions
        if not 0 <= low <= high <= p.high[row]:
            raise CacheRewindError(
                f"row {row} cannot move to positions {low}..{high}: it holds at most 0..{p.high[row] - 1}"
            )
        # The drafter at `low` reads window + 1 positions back; the ring must still hold them.
        if "sliding_attention" in self.kinds and p.written[row] - low > self.capacity - self.window - 2:
            raise CacheRewindError(
                f"sliding cache cannot move row {row} back to position {low}: it has written up to "
                f"{p.written[row] - 1} and keeps {self.capacity} positions (window {self.window})"
            )

    def rewind(self, n: int) -> None:
        """Forget every row's newest n positions (host-known positions only)."""
        if not self.positions.exact:
            raise CacheRewindError("rewind needs host-known positions; seek to ints first")
        self.seek([p - n for p in self.positions.low])

    # ----------------------------------------------------------------------------------------
    # The drafter's reads

    def views(self, producers: dict[str, int], dtype) -> dict[str, tuple[mx.array, mx.array, mx.array]]:
        """Per attention type, the producer layer's keys and values (whole buffers, no copy)
        and the additive mask [B, 1, 1, S] of what a drafter drafting at each row's position
        sees: every position before it (sliding: the window + 1 before it, inclusive as in
        transformers' bidirectional sliding mask, masking_utils.py 5.17)."""
        p = self.positions.offset[:, None, None, None]  # [B, 1, 1, 1]
        out = {}
        for kind, index in producers.items():
            layer = self.layers[index]
            S = layer.keys.shape[2]
            if kind == "full_attention":
                seen = mx.arange(S, dtype=mx.int32)[None, None, None] < p
            else:
                held = ring_positions(self.positions.offset, S)[:, None, None, :]
                seen = (held >= 0) & (held >= p - self.window - 1)
            out[kind] = (layer.keys, layer.values, _additive(seen, dtype))
        return out

    # ----------------------------------------------------------------------------------------
    # Rows joining and leaving

    def take(self, rows: list[int]) -> Cache:
        """A cache of these rows (their own copies), in this order."""
        index = mx.array(rows, dtype=mx.int32)
        out = Cache(self.kinds, self.window)
        p, q = self.positions, out.positions
        q.offset = mx.take(p.offset, index)
        q.low, q.high, q.written = ([v[r] for r in rows] for v in (p.low, p.high, p.written))
        for mine, theirs in zip(self.layers, out.layers):
            if mine.keys is not None:
                theirs.keys = mx.take(mine.keys, index, axis=0)
                theirs.values = mx.take(mine.values, index, axis=0)
        return out

    @staticmethod
    def join(caches: list[Cache]) -> Cache:
        """One cache of every row of `caches`, in order (full buffers padded to the longest)."""
        first = caches[0]
        out = Cache(first.kinds, first.window)
        q = out.positions
        q.offset = mx.concatenate([c.positions.offset for c in caches])
        for name in ("low", "high", "written"):
            setattr(q, name, [v for c in caches for v in getattr(c.positions, name)])
        for i, layer in enumerate(out.layers):
            parts = [c.layers[i] for c in caches]
            if any(part.keys is None for part in parts):
                raise ValueError("cannot join a cache that holds nothing yet")
            capacity = max(part.keys.shape[2] for part in parts)
            layer.keys = mx.concatenate([_padded(part.keys, capacity) for part in parts])
            layer.values = mx.concatenate([_padded(part.values, capacity) for part in parts])
        return out


def _padded(buffer: mx.array, capacity: int) -> mx.array:
    """buffer [B, H, S, D] with zeros up to `capacity` positions."""
    missing = capacity - buffer.shape[2]
    return buffer if not missing else mx.pad(buffer, [(0, 0), (0, 0), (0, missing), (0, 0)])
