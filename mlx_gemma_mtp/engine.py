"""The batched engine: requests join and leave a batch of rows decoded speculatively together.

One `step()` runs one round for every decoding row (`speculative.py`) and, while rows wait to
join, one prefill chunk of the first of them (all of their prefill when nothing decodes), so a
long prompt never stalls the batch for more than a chunk. Rounds are pipelined: a step queues
round r+1 and then reads round r back (the one host sync of a step), so the device works while
the host turns outcomes into events. Rows join and leave between rounds without draining the
pipeline: a joining row's first token is read with the round it rides along, and a leaving
row's share of the round in flight is dropped. A row that ends holds its slot for the next
request to join (`HOLD_STEPS`), so the batch does not change size with every row that ends.

Each row keeps exactly what it accepted: its own position and cache extent (`cache.py`), its
own sampling settings and seed. One k per round for every row (the verify forward has one
shape; a row's extra drafts cost nothing to verify): the draft-length policy chooses it from
every row's acceptance and what rounds of this batch size cost.

The engine is not thread-safe: one thread owns it and calls every method.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx

from .cache import MAX_WRITE, Cache, CacheRewindError
from .draft_length import DraftLength, Fixed
from .drafter import Drafter
from .sample import GREEDY, Sampling, random_seed, seed_words
from .speculative import (
    MAX_DRAFT,
    Proposer,
    Queued,
    Rows,
    drafter_proposer,
    log_probs_of,
    pick,
    prefill,
    queue_round,
)
from .target import Target

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)
# A finished row's slot stays in the batch, decoding for nobody, for up to this many steps or
# until a joining request takes it, so that the rounds keep their shape (docs/engine.md, "Held
# slots": what a new batch size costs); held slots go all at once (`Engine._release`).
HOLD_STEPS = 8
# A kept cache whose ids part from a new prompt's before its end serves that prompt only when
# they share this many ids, and then as a copy: the entry stays for its own conversation's next
# turn. Fewer (a chat template's first few ids, a BOS) save next to nothing of a prefill, whose
# cost is its chunk's, not a few ids'.
MIN_SHARED = 64


@dataclass
class PromptCache:
    """One conversation's cache (a one-row `Cache`) and the token ids whose K/V it holds: a
    request continuing `tokens` prefills only what is new. `stream_generate` keeps here the
    draft-length policy that drafted the conversation (its model, drafter and setting with it),
    so that the next turn starts from the acceptance and costs the last ones showed."""

    cache: Cache | None = None
    tokens: list[int] = field(default_factory=list)
    drafting: tuple | None = None  # (model, drafter, num_draft_tokens, policy)


@dataclass(frozen=True, kw_only=True)
class Request:
    prompt: Sequence[int]  # token ids: non-empty, inside the vocabulary, shorter than the context
    max_tokens: int  # at most; generation also ends where the model's context does ("length")
    sampling: Sampling = GREEDY  # this row's settings, seed included
    stop_ids: frozenset[int] | None = None  # None: the checkpoint's stop ids
    logprobs: int | None = None  # None: none; n in 0..MAX_LOGPROBS: each token's and the top n
    cache: PromptCache | None = None  # start from (and leave the row's cache in) this conversation


class _Rates:
    """Acceptance rates from `drafted`, `accepted` and `rounds`."""

    drafted: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Drafts accepted / drafted (0.0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per drafting round."""
        return self.accepted / self.rounds if self.rounds else 0.0


@dataclass(frozen=True, kw_only=True)
class Usage(_Rates):
    """A row's running totals (or, summed, a batch's)."""

    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from a prompt cache (not prefilled)
    generation_tokens: int  # emitted so far, a final stop id included
    drafted: int
    accepted: int
    rounds: int  # drafting rounds the row took part in
    draft_lengths: tuple[int, ...]  # its rounds per drafted length k = 0..MAX_DRAFT (k = 0: a plain step)


@dataclass(frozen=True, kw_only=True)
class Event:
    """What one row got from one step."""

    rid: int
    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]
    logprobs: tuple[float, ...] | None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None
    finish_reason: str | None  # "stop" (a stop id, the last token), "length", "cancelled"; None: more to come
    usage: Usage


@dataclass
class DraftStats(_Rates):
    """A row's drafting so far."""

    rounds: int = 0  # drafting rounds (k >= 1)
    drafted: int = 0
    accepted: int = 0
    # Each drafting round, in order: (tokens emitted before it, k, drafts accepted).
    round_log: list[tuple[int, int, int]] = field(default_factory=list)
    # Rounds per drafted length k = 0..MAX_DRAFT; a plain step counts as k = 0.
    k_histogram: list[int] = field(default_factory=lambda: [0] * (MAX_DRAFT + 1))

    def record(self, k: int, accepted: int, emitted: int) -> None:
        self.k_histogram[k] += 1
        if k:
            self.rounds += 1
            self.drafted += k
            self.accepted += accepted
            self.round_log.append((emitted, k, accepted))


@dataclass
class _Row:
    """The host's record of one request."""

    rid: int
    request: Request
    prompt: list[int]
    stop_ids: frozenset[int]
    limit: int  # tokens it may emit: max_tokens, or what the model's context leaves
    cached: int = 0  # prompt tokens reused from a prompt cache
    cache: Cache | None = None  # while waiting: its own cache, being prefilled
    done: int = 0  # prompt tokens in that cache
    emitted: list[int] = field(default_factory=list)
    stats: DraftStats = field(default_factory=DraftStats)
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.limit - len(self.emitted)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached,
            generation_tokens=len(self.emitted),
            drafted=self.stats.drafted,
            accepted=self.stats.accepted,
            rounds=self.stats.rounds,
            draft_lengths=tuple(self.stats.k_histogram),
        )


@dataclass
class _First:
    """A joining row's first token, picked on the device and read with the next read-back."""

    rid: int
    token: mx.array  # [1] int32
    logprobs: tuple[mx.array, mx.array, mx.array] | None


class ContextError(ValueError):
    """A prompt that leaves the model's context no room for a token."""


class Engine:
    """Decode many requests as one batch; see the module docstring.

    num_draft_tokens: a draft-length policy (`draft_length`), or an int (fixed; 0 decodes
    plainly). max_batch: rows decoded together; more requests wait. prefix_cache_size: finished
    rows' caches kept for reuse by a request that continues them (0: none). propose: drafts
    from elsewhere than `drafter` (a benchmark's replayed continuation, a test's script).
    hold_steps: how long a finished row's slot waits for a request (`HOLD_STEPS`; 0: none).
    """

    def __init__(
        self,
        model: Target,
        drafter: Drafter | None = None,
        *,
        num_draft_tokens: int | DraftLength = 0,
        max_batch: int = 8,
        prefix_cache_size: int = 0,
        propose: Proposer | None = None,
        hold_steps: int = HOLD_STEPS,
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if not isinstance(hold_steps, int) or hold_steps < 0:
            raise ValueError(f"hold_steps must be an int >= 0, got {hold_steps!r}")
        self.hold_steps = hold_steps
        self.model = model
        self.policy = Fixed(num_draft_tokens) if isinstance(num_draft_tokens, int) else num_draft_tokens
        if propose is None and drafter is not None:
            propose = drafter_proposer(drafter, model)
        if propose is None:
            self.policy = Fixed(0)
        self.propose = propose
        self.max_batch = max_batch
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: OrderedDict[int, PromptCache] = OrderedDict()
        self._rows: dict[int, _Row] = {}  # every request not finished yet
        self._waiting: list[int] = []  # not joined yet, in arrival order
        self._batch: Rows | None = None  # the decoding rows
        self._pending: Queued | None = None
        self._firsts: list[_First] = []  # read with the next read-back
        self._held: dict[int, int] = {}  # finished rows still in the batch (held slots) -> step they ended
        self._steps = 0
        self._slots_queued = 0  # rows of the last round queued
        self._settling = 0  # steps left whose read-back is not timed: the batch changed size
        self._read_at = self._ended = time.perf_counter()  # the last read-back began; step ended
        # (k, rows, interval, build) of the round read back this step, where it is to be timed
        self._timing: tuple[int, int, float, float] | None = None
        self._device_wait = 0.0  # seconds the last step's read-back waited for the device
        self._last_round = (0, 0)  # (k, rows it ran for requests) of the round read back last step
        self._shadows = 0  # plain steps read back that carried a shadow
        self._next_rid = 0

    # ----------------------------------------------------------------------------------------
    # Requests

    def check(self, request: Request) -> None:
        """Raise ValueError naming what is wrong with `request`; add nothing."""
        check_request(self.model, request)

    def add(self, request: Request) -> int:
        """Queue `request` (checked first); its row id."""
        self.check(request)
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        stop_ids = frozenset(self.model.config.stop_ids) if request.stop_ids is None else request.stop_ids
        if request.sampling.seed is None and not request.sampling.greedy:
            request = replace(request, sampling=replace(request.sampling, seed=random_seed()))
        room = self.model.args.max_position_embeddings - len(request.prompt)
        limit = min(request.max_tokens, room)
        self._rows[rid] = _Row(
            rid=rid, request=request, prompt=list(request.prompt), stop_ids=stop_ids, limit=limit
        )
        self._waiting.append(rid)
        return rid

    def cancel(self, rid: int, keep: int | None = None) -> None:
        """Stop row `rid`: its last event (finish_reason "cancelled") comes with the next step.
        keep: of the tokens it emitted, how many its caller took (a prompt cache then holds
        those: a stream stopped inside an event's tokens)."""
        row = self._rows.get(rid)
        if row is not None:
            row.cancelled = True
            if keep is not None:
                del row.emitted[keep:]

    @property
    def busy(self) -> bool:
        return bool(self._rows)

    @property
    def batch_size(self) -> int:
        """Rows decoding (not counting held slots)."""
        return 0 if self._batch is None else len(self._batch.ids) - len(self._held)

    @property
    def slots(self) -> int:
        """Rows a round runs: the decoding ones and the slots held for joining requests."""
        return 0 if self._batch is None else len(self._batch.ids)

    @property
    def device_wait(self) -> float:
        """Seconds the last step's read-back waited for the device (its host sync)."""
        return self._device_wait

    @property
    def last_round(self) -> tuple[int, int]:
        """The draft length of the round the last step read back, and the requests' rows it
        ran (held slots not counted); (0, 0) when it read none."""
        return self._last_round

    @property
    def shadows(self) -> int:
        """Plain steps read back so far that carried a shadow (the policy's `shadow()`)."""
        return self._shadows

    @property
    def slack(self) -> float:
        """Seconds the caller may wait before the next step without the device going idle:
        what the last read-back waited for the device, while the round queued behind it runs
        (0 when none is queued)."""
        return self._device_wait if self._pending is not None else 0.0

    @property
    def free_rows(self) -> int:
        """Requests that, added now, would join with the next step (no row to wait for)."""
        return max(0, self.max_batch - self._occupied() - len(self._waiting))

    def _occupied(self) -> int:
        """Rows decoding, and rows whose only token is being read."""
        decoding = set() if self._batch is None else set(self._batch.ids) - set(self._held)
        return len(decoding) + sum(f.rid not in decoding for f in self._firsts)

    # ----------------------------------------------------------------------------------------
    # One step

    def step(self) -> list[Event]:
        """One round for every decoding row, and prefill for rows waiting to join; the events
        read back. [] when idle."""
        self._steps += 1
        events = self._cancelled()
        self._release(expired_only=True)
        admitted = self._admit()
        queued = self._queue(timed=not admitted)
        if queued is not None:
            if len(queued.ids) != self._slots_queued:
                self._settling = 2  # this step and the next are not timed (`_observe`)
            self._slots_queued = len(queued.ids)
        events += self._read_back(queued)
        self._settling = max(self._settling - 1, 0)
        self._time(queued, admitted)
        return events

    def _time(self, queued: Queued | None, admitted: bool) -> None:
        """Tell the policy what the round read back this step took, where `_observe` found it
        timeable and no prefill ran in the step: `seconds`, the interval between its read-back
        and the last one's (the device's time in a full pipeline); `own`, its exact share of the
        wall clock: the host's work building it, and the step that read it back (its wait and
        events, the caller's time since the last step) less building the round queued in it.
        A host-bound loop's intervals time the round queued after the one read; `own` does not."""
        ended, timing, self._timing = time.perf_counter(), self._timing, None
        if timing is not None and not admitted:
            k, rows, seconds, built = timing
            own = built + (ended - self._ended) - (queued.built if queued is not None else 0.0)
            self.policy.observe_time(k, rows, seconds, own=own)
        self._ended = ended

    def close(self) -> None:
        """End every request now, without events; rows with a prompt cache leave it holding
        what they emitted (all but the last token, which is the next input)."""
        for row in self._rows.values():
            row.cancelled = True
        self._cancelled()
        self._pending = None

    def _queue(self, timed: bool) -> Queued | None:
        """Queue the next round when one may go: not past every row's max_tokens, and behind a
        drafting round only when no row's logits processors need its outcome first."""
        rows, pending = self._batch, self._pending
        if rows is None:
            return None
        ahead = {rid: pending.k + 1 for rid in pending.ids} if pending else {}
        unread = {f.rid for f in self._firsts}
        live = [r for r in rows.ids if r not in self._held]
        limit = max(self._rows[r].remaining - ahead.get(r, 0) - (r in unread) for r in live) - 1
        if limit < 0 or (pending is not None and pending.k and rows.processors):
            return None
        began = time.perf_counter()
        k = min(self.policy.choose(min(limit, MAX_DRAFT), live), limit, MAX_DRAFT)
        asked = [self._rows[r].request.logprobs for r in live]
        top = max((n for n in asked if n is not None), default=None)
        shadow = not k and self.policy.shadow()
        behind = timed and pending is not None
        queued = queue_round(self.model, self.propose, rows, k, behind=behind, top=top, shadow=shadow)
        queued.built = time.perf_counter() - began
        return queued

    def _read_back(self, queued: Queued | None) -> list[Event]:
        """The step's host sync: read the pending round (and joining rows' first tokens) back
        into events; tell the policy; tighten what the host knows of every row's position;
        let finished rows go."""
        done, self._pending = self._pending, queued
        firsts, self._firsts = self._firsts, []
        now = time.perf_counter()
        events = []
        self._device_wait, self._last_round = 0.0, (0, 0)
        if done is not None:
            self._last_round = (done.k, sum(rid in self._rows for rid in done.ids))
            outcomes = done.read()
            self._device_wait = time.perf_counter() - now
            self._observe(done, outcomes, now)
            events += self._round_events(done, outcomes)
            self._tighten(done, outcomes, queued)
        self._read_at = now
        events += [self._first_event(f) for f in firsts]  # a joining row rode no earlier round
        self._leave([e.rid for e in events if e.finish_reason])
        return events

    def _cancelled(self) -> list[Event]:
        gone = [row for row in self._rows.values() if row.cancelled]
        events = [
            Event(rid=row.rid, tokens=(), from_draft=(), logprobs=None, top_logprobs=None,
                  finish_reason="cancelled", usage=row.usage())
            for row in gone
        ]  # fmt: skip
        self._leave([row.rid for row in gone])
        return events

    # ----------------------------------------------------------------------------------------
    # Rows joining

    def _admit(self) -> bool:
        """Prefill waiting rows: one chunk while rows decode, all of it otherwise; a row whose
        prompt is in joins the batch (or, asking one token, ends with its first). Whether any
        work was queued."""
        worked = False
        while self._waiting and self._occupied() < self.max_batch:
            row = self._rows[self._waiting[0]]
            if row.cache is None:
                self._start(row)
            worked = True
            if len(row.prompt) - row.done > MAX_WRITE:
                self.model(mx.array([row.prompt[row.done : row.done + MAX_WRITE]], dtype=mx.int32), row.cache)
                row.done += MAX_WRITE
                mx.async_eval(row.cache.state)
                if self._batch is not None:
                    break  # one chunk per step while rows decode
                continue
            self._waiting.pop(0)
            self._join(row, prefill(self.model, row.prompt[row.done :], row.cache))
        return worked

    def _start(self, row: _Row) -> None:
        """The row's cache: a prompt cache's, at its longest prefix of the prompt; or a fresh one."""
        own = row.request.cache
        source = own if own is not None else self._reusable(row.prompt)
        cache, held = (None, []) if source is None else (source.cache, source.tokens)
        if own is not None:
            # The row's own from now on, given back when it leaves (`_keep`): the prompt cache
            # holding it as well would keep a second copy alive while the batch decodes.
            own.cache, own.tokens = None, []
        common = 0
        if cache is not None:
            common = _common(held, row.prompt)
            try:
                cache.seek([common])
            except CacheRewindError:  # the sliding window no longer holds that far back
                cache, common = None, 0
        row.cache = self.model.make_cache() if cache is None else cache
        row.cached = row.done = common

    def _reusable(self, prompt: list[int]) -> PromptCache | None:
        """The kept cache sharing the longest prefix with `prompt`: taken out of the store when
        `prompt` continues all it holds (a conversation's next turn); a copy of it when they part
        earlier but share at least MIN_SHARED ids (a system prompt; the entry stays); else none."""
        lengths = {key: _common(entry.tokens, prompt) for key, entry in self._prefixes.items()}
        best = max(lengths, key=lengths.__getitem__, default=None)
        if best is None or not lengths[best]:
            return None
        entry = self._prefixes[best]
        if lengths[best] == len(entry.tokens):
            return self._prefixes.pop(best)
        if lengths[best] < MIN_SHARED:
            return None
        self._prefixes.move_to_end(best)  # recently useful
        return PromptCache(entry.cache.take([0]), entry.tokens)

    def _join(self, row: _Row, hidden: mx.array) -> None:
        """The row's first token, picked on the device; the row joins the batch behind it."""
        s = row.request.sampling
        history = mx.array(row.prompt, dtype=mx.int32) if s.processors else None
        seeds = mx.array([seed_words(s.seed or 0)], dtype=mx.uint32)
        alone = Rows([row.rid], row.cache, mx.zeros((1, 1), mx.int32), hidden, [s], seeds, [history])
        logits = self.model.logits(hidden)  # [1, 1, V]
        if history is not None:
            logits = s.process(logits[0], history)[None]
        token = pick(logits, alone, row.cache.positions.offset)  # [1]: the token at position len(prompt)
        top = row.request.logprobs
        logprobs = None if top is None else log_probs_of(logits, token[:, None], top)
        mx.async_eval(token, *(logprobs or ()))
        self._firsts.append(_First(row.rid, token, logprobs))
        if row.limit == 1:
            return  # it ends with its first token
        alone.token = token[:, None]
        alone.histories = [None if history is None else mx.concatenate([history, token])]
        batch = self._batch
        if batch is not None and self._held:  # it takes a held slot: the batch keeps its size
            slot = batch.ids.index(min(self._held, key=self._held.__getitem__))
            del self._held[batch.ids[slot]]
            batch = batch.take([b for b in range(len(batch.ids)) if b != slot])
        self._batch = alone if batch is None else Rows.join([batch, alone])
        row.cache = None  # the batch holds it now

    # ----------------------------------------------------------------------------------------
    # Read-back

    def _first_event(self, first: _First) -> Event:
        row = self._rows[first.rid]
        return self._emit(row, [first.token.item()], [False], first.logprobs, 0)

    def _round_events(self, done: Queued, outcomes: list[tuple[list[int], int]]) -> list[Event]:
        events = []
        for b, (rid, (tokens, kept)) in enumerate(zip(done.ids, outcomes)):
            row = self._rows.get(rid)
            if row is None or _finished(row):
                continue  # left the batch: its share of the round is dropped
            row.stats.record(done.k, kept, len(row.emitted))
            events.append(self._emit(row, tokens, [True] * kept + [False], done.logprobs, b))
        return events

    def _observe(self, done: Queued, outcomes, now: float) -> None:
        if done.k:
            alive = {rid: kept for rid, (_, kept) in zip(done.ids, outcomes) if rid in self._rows}
            self.policy.observe(done.k, alive)
        shadow = done.read_shadow()
        if shadow is not None:  # what a round of one draft would have kept; the step is not timed
            self._shadows += 1
            self.policy.observe(1, {rid: kept for rid, kept in zip(done.ids, shadow) if rid in self._rows})
            return
        # Timed only in a full pipeline: queued behind the round read at `_read_at`, with the
        # next one queued behind it; the interval is then this round's own device time. Not in
        # the step that queued the first round at a new batch size nor the next: on MLX CUDA
        # those ran up to ~+40 and ~+20 ms (docs/engine.md, "Held slots"), not what such rounds cost.
        if done.behind and self._pending is not None and not self._settling:
            self._timing = (done.k, self._last_round[1], now - self._read_at, done.built)  # `_time`

    def _emit(self, row: _Row, tokens: list[int], from_draft: list[bool], logprobs, b: int) -> Event:
        """The event of `tokens` for `row`, cut at a stop id (kept) or at its limit (max_tokens,
        or the model's context)."""
        cut, finish = len(tokens), None
        for i, token in enumerate(tokens):
            if token in row.stop_ids:
                cut, finish = i + 1, "stop"
                break
        if len(row.emitted) + cut >= row.limit:
            cut, finish = row.limit - len(row.emitted), finish or "length"
        row.emitted += tokens[:cut]
        chosen = top = None
        if row.request.logprobs is not None:
            values, ids, alternatives = (a[b].tolist() for a in logprobs)
            chosen = tuple(values[:cut])
            n = row.request.logprobs
            top = tuple(tuple(zip(i[:n], v[:n])) for i, v in zip(ids[:cut], alternatives[:cut]))
        return Event(
            rid=row.rid, tokens=tuple(tokens[:cut]), from_draft=tuple(from_draft[:cut]), logprobs=chosen,
            top_logprobs=top, finish_reason=finish, usage=row.usage(),
        )  # fmt: skip

    def _tighten(self, done: Queued, outcomes, queued: Queued | None) -> None:
        """What the host knows of each decoding row's position now that `done` is read."""
        rows = self._batch
        if rows is None:
            return
        after = {rid: start + kept + 1 for rid, start, (_, kept) in zip(done.ids, done.starts, outcomes)}
        if done.k and rows.processors:  # drafting rounds are read before the next: extend the histories
            tokens = {rid: t for rid, (t, _) in zip(done.ids, outcomes)}
            rows.histories = [
                h
                if h is None or rid not in tokens
                else mx.concatenate([h, mx.array(tokens[rid], dtype=mx.int32)])
                for rid, h in zip(rows.ids, rows.histories)
            ]
        p = rows.cache.positions
        if queued is None:  # nothing in flight: every position is known
            rows.cache.seek([after.get(rid, low) for rid, low in zip(rows.ids, p.low)])
            return
        low, high = list(p.low), list(p.high)
        for b, rid in enumerate(queued.ids):
            if queued.starts[b] is None:
                start = queued.starts[b] = after[rid]
                low[b], high[b] = start + 1, start + queued.k + 1
        rows.cache.seek(p.offset, low, high)

    # ----------------------------------------------------------------------------------------
    # Rows leaving

    def _leave(self, rids: list[int]) -> None:
        """Rows that finished or were cancelled: out of the batch, their caches kept where asked."""
        if not rids:
            return
        gone = set(rids)
        self._firsts = [f for f in self._firsts if f.rid not in gone]
        batch = self._batch
        # A held slot moves on past its row's end: not where the model's context is near.
        room = self.model.args.max_position_embeddings - self.hold_steps * (MAX_DRAFT + 1)
        near_end = False
        for rid in rids:
            row = self._rows.pop(rid)
            self.policy.forget(rid)
            if rid in self._waiting:
                self._waiting.remove(rid)
                self._keep(row, row.cache, row.done, row.prompt[: row.done])
            elif batch is not None and rid in batch.ids:
                near_end |= len(row.prompt) + len(row.emitted) >= room
                if self._keeps(row):
                    tokens = row.prompt + row.emitted[:-1] if row.emitted else row.prompt
                    cache = batch.cache if len(batch.ids) == 1 else batch.cache.take([batch.ids.index(rid)])
                    self._keep(row, cache, len(tokens), tokens)
            elif row.cache is not None:  # it ended with its first token: its cache holds the prompt
                self._keep(row, row.cache, len(row.prompt), row.prompt)
        if batch is not None:
            self._held.update(dict.fromkeys(gone.intersection(batch.ids), self._steps))
            self._release(now=near_end)

    def _release(self, *, now: bool = False, expired_only: bool = False) -> None:
        """Drop the held slots, all at once (the batch then shrinks once), when `now`, when one
        of them was held `hold_steps` steps, or (unless `expired_only`) when they are as many as
        the rows decoding; keep them otherwise. A held slot decodes for nobody: its outcome is
        dropped, its cache (its own copy) moves on past where its row ended, at most
        `hold_steps` rounds."""
        batch = self._batch
        if batch is None or not self._held:
            return
        live = [b for b, rid in enumerate(batch.ids) if rid not in self._held]
        expired = self._steps - min(self._held.values()) >= self.hold_steps
        if now or expired or (not expired_only and len(live) <= len(self._held)):
            self._batch = batch.take(live) if live else None
            self._held.clear()

    def _keeps(self, row: _Row) -> bool:
        """Whether a row that leaves leaves its cache somewhere: its prompt cache or the store."""
        return row.request.cache is not None or self.prefix_cache_size > 0

    def _keep(self, row: _Row, cache: Cache | None, position: int, held: list[int]) -> None:
        """Leave the row's cache, at `position`, holding `held`, in its prompt cache or the store.
        A copy taken from the batch is made now: unevaluated it would hold the whole batch's
        buffers of that moment for as long as it is kept."""
        if cache is None or not position or not self._keeps(row):
            return
        target = row.request.cache
        if target is None:
            if not self.prefix_cache_size:
                return
            target = PromptCache()
            self._prefixes[row.rid] = target
            while len(self._prefixes) > self.prefix_cache_size:
                self._prefixes.popitem(last=False)
        cache.seek([position])
        mx.async_eval(cache.state)
        target.cache, target.tokens = cache, held


def _common(held: list[int], prompt: list[int]) -> int:
    """Leading ids `held` shares with `prompt`, leaving at least one prompt id to run."""
    n, limit = 0, min(len(held), len(prompt) - 1)
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n


def _finished(row: _Row) -> bool:
    return row.cancelled or row.remaining <= 0 or bool(row.emitted and row.emitted[-1] in row.stop_ids)


def check_request(model: Target, request: Request) -> None:
    """Raise ValueError naming what is wrong with `request`."""
    prompt = request.prompt
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise ValueError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
    if not len(prompt):
        raise ValueError("prompt is empty: nothing to continue from")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt must be a list of int token ids")
    vocab = model.args.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    n = request.max_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {n!r}")
    context = model.args.max_position_embeddings
    if len(prompt) >= context:
        raise ContextError(
            f"prompt of {len(prompt)} tokens does not fit the model's context of {context} tokens "
            "(max_position_embeddings): nothing can follow it"
        )
    top = request.logprobs
    if top is not None and (
        not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS
    ):
        raise ValueError(f"logprobs must be an int in 0..{MAX_LOGPROBS} (or None), got {top!r}")
