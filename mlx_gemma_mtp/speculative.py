"""The speculative loop: draft from the last accepted position, verify in one target forward,
keep what the acceptance rule keeps plus one token of the target's own, rewind the rejected tail.

Greedy (temperature 0): a draft is kept only where it equals the target's argmax, so the output
is the target's own greedy output. Sampling: drafts are drawn from the drafter's q and judged
by `sample.judge` (Leviathan et al. 2023), so every token is distributed as the target's p.
Either way one host sync per round. A round may also draft nothing (`draft_length.py` chose
k = 0): it is then one step of plain decoding.

Rounds are pipelined too. Everything a round needs from the one before (how many drafts were
kept, the token after them, its hidden state, where the next write goes) stays on the device,
so round r+1 is queued before the host reads round r back: the host's graph building and
kernel launches overlap the device's work instead of adding to it. The caches take the
device-side position (`cache.py`); the host reads each round one round late, so plain steps
run pipelined as mlx-lm's generate_step does, and a probe round between them drains nothing.
Logits processors need the host to know the history, so with them a drafting round is read
right away (a plain step extends the history on the device and stays pipelined).

Token generators here yield `(token, from_draft)` forever; the caller stops iterating (stop id,
max tokens, a UI's stop button). Whenever they stop, the cache is left holding the prompt and
every yielded token but the last (mlx-lm's convention: the last token is the next input), so
the next turn can continue from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .cache import Position
from .draft_length import MAX_DRAFT, DraftLength, Fixed
from .drafter import Drafter, compiled_step
from .sample import GREEDY, Sampling, judge, random_key
from .target import Target

PREFILL_CHUNK = 512  # prompt positions per prefill forward, to bound activation memory


@dataclass(frozen=True, kw_only=True)
class DraftRequest:
    """What a round's proposer drafts from."""

    token: mx.array  # [1, 1] last accepted token; not in the cache yet
    hidden: mx.array  # [1, 1, hidden] target hidden state (after the final norm) that predicted it
    # Position of `token`: the cache holds positions 0 .. position-1. A device scalar when the
    # round is queued before the previous one is read back (pipelined), else an int.
    position: Position
    generated: Position  # tokens emitted before this round, `token` included; int or device scalar
    k: int  # how many tokens to draft
    sampling: Sampling = GREEDY  # what q must share with p: temperature, filters, processors
    key: mx.array | None = None  # PRNG key to draw the drafts with (None when greedy)
    history: mx.array | None = None  # [n] every token so far, `token` last; None without processors


@dataclass(frozen=True, kw_only=True)
class Draft:
    """A proposer's k draft tokens and the distribution q they were drawn from, lazily.

    q is needed only when sampling. None means the drafts are deterministic given the request
    (greedy drafts, scripted or replayed tokens): q is then a point mass on each, which the
    acceptance rule handles exactly. A wrapper that substitutes tokens must either keep them
    drawn from q or set q to None.
    """

    tokens: mx.array  # [1, k] int
    q: mx.array | None = None  # [k, N] float32 probabilities each draft was drawn from
    q_ids: mx.array | None = None  # [k, N] distinct token ids of q's columns; None: N = vocab


# A proposer turns a request and the target cache (read in place, never written) into a Draft.
Proposer = Callable[[DraftRequest, list], Draft]


@dataclass
class DraftStats:
    """Running counts of one generation, filled in by the token generators."""

    rounds: int = 0  # drafting rounds (k >= 1)
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # made by the rounds and plain steps recorded (the prefill's first is not)
    # Each drafting round, in order: (tokens made before it, k, drafts accepted). Where a
    # policy drafted, not only how often, is what tells its probes from its runs of rounds.
    round_log: list[tuple[int, int, int]] = field(default_factory=list)
    # Rounds per drafted length k = 0..MAX_DRAFT; a plainly decoded token counts as k = 0.
    k_histogram: list[int] = field(default_factory=lambda: [0] * (MAX_DRAFT + 1))

    def record(self, k: int, accepted: int) -> None:
        self.k_histogram[k] += 1
        if k:
            self.rounds += 1
            self.drafted += k
            self.accepted += accepted
            self.round_log.append((self.tokens, k, accepted))
        self.tokens += accepted + 1

    @property
    def accepted_per_round(self) -> list[int]:
        return [accepted for _, _, accepted in self.round_log]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per drafting round."""
        return self.accepted / self.rounds if self.rounds else 0.0


def drafter_proposer(drafter: Drafter, target: Target) -> Proposer:
    """Drafts from an MTP drafter reading the target cache's K/V in place: greedy, or sampled
    from its q after the request's transforms."""

    # Compiled once per proposer (a generation); the greedy one with the head inside.
    greedy_step = compiled_step(drafter, target.embed, drafter.greedy_token)
    forward = compiled_step(drafter, target.embed)

    def propose(request: DraftRequest, cache: list) -> Draft:
        shared_kv = {kind: cache[layer].view() for kind, layer in target.kv_producers.items()}
        token, hidden, history = request.token, request.hidden, request.history
        # A device scalar either way: a host int would be traced as a constant, once per value.
        position = mx.array(request.position, mx.int32)
        keys = None if request.sampling.greedy else mx.random.split(request.key, request.k)
        # Greedy without processors: the head _draft_step would run is the compiled step's own.
        head_inside = request.sampling.greedy and not request.sampling.processors
        steps = []
        for i in range(request.k):
            if head_inside:
                token, hidden = greedy_step(token, hidden, position, shared_kv)
                step = (token, None, None)
            else:
                h, hidden = forward(token, hidden, position, shared_kv)
                step = _draft_step(drafter, h, request.sampling, history, None if keys is None else keys[i])
                token = step[0]
            history = _extended(history, token.reshape(1))
            steps.append(step)
        tokens, q, q_ids = (list(column) for column in zip(*steps))
        return Draft(
            tokens=mx.concatenate(tokens, axis=1),
            q=None if request.sampling.greedy else mx.concatenate(q, axis=0),
            q_ids=None if q_ids[0] is None else mx.concatenate(q_ids, axis=0),
        )

    return propose


def _draft_step(drafter: Drafter, h: mx.array, sampling: Sampling, history, key):
    """One draft token [1, 1] from drafter state h [1, 1, h], with its q [1, N] and ids [1, N]
    (None when greedy / when the head spans the vocabulary)."""
    if drafter.config.use_ordered_embeddings:
        # Logits processors need a vocabulary-wide row; the clustered head's q goes without
        # them (still exact: q only has to be what the draft was drawn from).
        if sampling.greedy:
            return drafter.greedy_token(h), None, None
        ids, logits = drafter.candidate_logits(h)  # [1, 1, N] each
        logq = sampling.log_probs(logits[0])  # [1, N]
        pick = mx.random.categorical(logq, key=key)  # [1], an index into the candidates
        return mx.take_along_axis(ids[0], pick[:, None], axis=-1), mx.exp(logq), ids[0]
    logits = sampling.process(drafter.logits(h)[0], history)  # [1, V]
    if sampling.greedy:
        return mx.argmax(logits, axis=-1, keepdims=True), None, None
    logq = sampling.log_probs(logits)
    return mx.random.categorical(logq, key=key)[:, None], mx.exp(logq), None


def _extended(history: mx.array | None, tokens) -> mx.array | None:
    """history [n] + tokens (a list or an array [m]), or None when no processor needs it."""
    if history is None:
        return None
    tokens = mx.array(tokens, dtype=mx.int32) if isinstance(tokens, list) else tokens.astype(mx.int32)
    return mx.concatenate([history, tokens])


def prefill(target: Target, prompt: mx.array, cache: list) -> mx.array:
    """Run the prompt [1, n] through the target; the hidden state of its last position [1, 1, H]."""
    n = prompt.shape[1]
    for start in range(0, n - PREFILL_CHUNK, PREFILL_CHUNK):
        target(prompt[:, start : start + PREFILL_CHUNK], cache)
        mx.eval([c.state for c in cache])
    last = (n - 1) // PREFILL_CHUNK * PREFILL_CHUNK
    return target(prompt[:, last:], cache)[:, -1:]


def rewind(cache: list, n: int) -> None:
    for c in cache:
        c.trim(n)  # raises CacheRewindError rather than rewind inexactly


def settle(cache: list, start: int, prompt_len: int, yielded: int) -> None:
    """Leave the cache holding what it held at `start`, the prompt, and every yielded token but
    the last, whatever state a round was in (a stop inside an accepted run, a round still
    queued, an exception mid-forward)."""
    for c in cache:
        c.seek(start + prompt_len + max(yielded, 1) - 1)


def greedy(target: Target, hidden: mx.array) -> mx.array:
    """The target's argmax token for each row of hidden [B, L, H]: [B, L]."""
    return mx.argmax(target.logits(hidden), axis=-1)


def _split(key: mx.array | None, n: int = 2):
    """n independent keys from `key` (Nones when greedy)."""
    return [None] * n if key is None else list(mx.random.split(key, n))


@dataclass
class _Cursor:
    """Where a generation stands: `token` is chosen (the last emitted), not yet in the cache.

    `position` is a device scalar while a queued round has not been read back; the host
    then knows only `low <= position <= high`."""

    token: mx.array  # [1, 1]
    hidden: mx.array  # [1, 1, H] the target hidden state that predicted `token`
    position: Position  # of `token`; the cache holds 0 .. position-1
    history: mx.array | None  # [n] every token so far, `token` last; None without processors
    key: mx.array | None  # PRNG key for what follows; None when greedy
    low: int = 0
    high: int = 0
    generated: int = 0  # tokens yielded


def _start(target, prompt, cache, sampling, key, context) -> tuple[_Cursor, int]:
    """Prefill and choose the first token: the cursor on it, and its id (the one host sync)."""
    start = cache[0].offset
    if key is None and not sampling.greedy:
        key = random_key(None)
    history = None
    if sampling.processors:
        history = mx.array(list(context) + mx.reshape(prompt, (-1,)).tolist(), dtype=mx.int32)
    hidden = prefill(target, prompt, cache)
    key, pick_key = _split(key)
    first = sampling.pick(sampling.process(target.logits(hidden)[0], history), pick_key).item()
    position = start + prompt.shape[1]
    cursor = _Cursor(
        token=mx.array([[first]], dtype=mx.int32),
        hidden=hidden,
        position=position,
        history=_extended(history, [first]),
        key=key,
        low=position,
        high=position,
    )
    return cursor, first


@dataclass
class _Queued:
    """A round (k = 0: a plain step) queued on the device and not read back yet."""

    k: int
    exact: bool  # queued at a position the host knew (not behind an unread drafting round)
    # Queued while another round ran: read back one round late, its time is the interval
    # between two read-backs of a full pipeline. A round queued into an empty pipeline also
    # waits for its own graph to be built and launched (seen on MLX CUDA: a plain step timed
    # so took 2x, and made plain decoding look dearer than useless drafting).
    behind: bool
    start: int | None  # position of its first verified token, once the host knows it
    # [k + 2] int32: the drafts, how many the acceptance rule keeps, the token after them; a
    # plain step's [1]: its token (nothing more to build into the graph plain decoding runs).
    # Built and scheduled with the round: an op made at read-back time would queue behind
    # the next round, and reading it would wait for that one too (the pipeline lost).
    outcome: mx.array


def speculative_tokens(
    target: Target,
    prompt: mx.array,
    cache: list,
    propose: Proposer,
    num_draft: int | DraftLength,
    max_tokens: int,
    stats: DraftStats,
    *,
    sampling: Sampling = GREEDY,
    key: mx.array | None = None,
    context: Sequence[int] = (),
) -> Iterator[tuple[int, bool]]:
    """Speculative decoding from `prompt` [1, n]: yields (token, from_draft) forever.

    num_draft: drafts per round, an int (fixed) or a `DraftLength` policy; no round drafts past
    `max_tokens` nor past MAX_DRAFT. sampling / key: how tokens are drawn (greedy by default;
    a sampled run without a key draws one from MLX's global generator). context: the token ids
    the cache already holds before `prompt`, for the logits processors. Greedy output equals
    plain greedy decoding of `target`; sampled output is distributed as plain sampling.

    Every step is a round, plain ones (k = 0: one target forward of one token) included, so a
    round of drafts can be queued between plain steps without draining the pipeline: a probe
    of a useless drafter costs one verify of two tokens instead of one, not a round trip.
    """
    policy = Fixed(num_draft) if isinstance(num_draft, int) else num_draft
    start = cache[0].offset  # a reused cache continues where it stands
    cursor, first = _start(target, prompt, cache, sampling, key, context)
    base = cursor.position - 1  # position - base = tokens emitted up to the one at `position`
    pending: _Queued | None = None  # queued, not read back
    resolved_at = time.perf_counter()
    emitted = [(first, False)]  # read back, not yielded yet

    def release():
        """Yield what was read back (the generator's caller may stop at any of them)."""
        nonlocal emitted
        handed, emitted = emitted, []
        for item in handed:
            cursor.generated += 1  # counted before the yield: a stop there has received it
            yield item

    try:
        while True:
            if pending is not None:
                yield from release()  # the device runs `pending` while the caller takes them
            # Tokens that may be emitted before the next round: those read back, and a
            # pending round's at most k + 1. No round drafts past max_tokens.
            limit = max_tokens - (cursor.generated + len(emitted)) - 1 - (pending.k + 1 if pending else 0)
            # A round is queued behind a pending one only when it does not need the pending
            # one's outcome on the host: logits processors read the history, which a drafting
            # round extends by a count the host has not read yet.
            if pending is not None and (limit < 0 or (sampling.processors and pending.k)):
                emitted, pending = _read_back(pending, cursor, cache, None, policy, stats, resolved_at), None
                resolved_at = time.perf_counter()
                continue
            limit = max(limit, 0)
            k = min(policy.choose(limit), limit, MAX_DRAFT)  # sliding caches keep room for MAX_DRAFT
            queued = _queue_round(target, cache, propose, cursor, k, sampling, base, behind=pending is not None)
            # Into an empty pipeline (the first token, or after a drain): what was read back is
            # handed over once the device has the next round to run (as mlx-lm's
            # generate_step queues its second forward before yielding the first token).
            yield from release()
            if pending is None:
                pending = queued  # nothing to read back yet: queue the next round
                continue
            done, pending = pending, queued
            emitted = _read_back(done, cursor, cache, pending, policy, stats, resolved_at)
            resolved_at = time.perf_counter()
    finally:
        settle(cache, start, prompt.shape[1], cursor.generated)


def _queue_round(
    target, cache, propose, cursor: _Cursor, k: int, sampling: Sampling, base: int, *, behind: bool
) -> _Queued:
    """Draft k (none when k = 0) and verify them in one forward, all on the device: the
    acceptance rule's outcome stays there, `cursor` and the caches move to where the next
    round starts."""
    key, draft_key, judge_key = _split(cursor.key, 3)
    if k:
        request = DraftRequest(
            token=cursor.token, hidden=cursor.hidden, position=cursor.position, generated=cursor.position - base,
            k=k, sampling=sampling, key=draft_key, history=cursor.history,
        )  # fmt: skip
        draft = propose(request, cache)
        drafts = draft.tokens.astype(mx.int32)  # [1, k]
        # The device drafts while the host builds the verify graph (not a sync: nothing waits).
        mx.async_eval(drafts, *(a for a in (draft.q, draft.q_ids) if a is not None))
        verify_hidden = target(mx.concatenate([cursor.token, drafts], axis=1), cache)  # [1, k+1, H]
        logits = sampling.process(target.logits(verify_hidden)[0], cursor.history, drafts[0])  # [k+1, V]
        kept, follow = _accept(logits, drafts[0], draft, sampling, judge_key)
        hidden = mx.take(verify_hidden, kept.reshape(1), axis=1)
        outcome = mx.concatenate([drafts[0], kept[None], follow[None]])
    else:  # a plain step: the next token as plain decoding picks it
        hidden = target(cursor.token, cache)  # [1, 1, H]
        logits = sampling.process(target.logits(hidden)[0], cursor.history)  # [1, V]
        follow = sampling.pick(logits, judge_key)[0].astype(mx.int32)
        outcome = follow[None]
    exact = isinstance(cursor.position, int)
    queued = _Queued(k=k, exact=exact, behind=behind, start=cursor.position if exact else None, outcome=outcome)
    cursor.token = follow.reshape(1, 1)
    cursor.hidden = hidden
    cursor.position = cursor.position + (kept + 1 if k else 1)  # a plain step keeps an int an int
    cursor.low, cursor.high = cursor.low + 1, cursor.high + k + 1
    cursor.key = key
    if k:
        for c in cache:
            c.seek(cursor.position, cursor.low, cursor.high)
    else:
        # Its forward moved every cache one position on, as the cursor: no seek (a loop over
        # every layer per plain token). Its one token is known to follow, read or not: the
        # history can take it now, so the next round can be queued behind this one even with
        # logits processors.
        cursor.history = _extended(cursor.history, cursor.token[0])
    mx.async_eval(queued.outcome, follow, cursor.hidden, *([cursor.position] if k else []))
    return queued


def _accept(logits, drafts, draft: Draft, sampling: Sampling, key) -> tuple[mx.array, mx.array]:
    """How many drafts the rule keeps and the token after them, both [] int32 on the device.

    logits: [k+1, V] the target's processed logits at the drafted positions and the next.
    """
    k = drafts.shape[0]
    if sampling.greedy:
        targets = mx.argmax(logits, axis=-1).astype(mx.int32)  # the target's own token per row
        keeps, follows = drafts == targets[:k], targets
    else:
        keeps, follows = judge(sampling.log_probs(logits), drafts, draft.q, draft.q_ids, key)
    kept = mx.sum(mx.cumprod(keeps.astype(mx.int32)))  # drafts before the first rejection
    return kept, mx.take(follows.astype(mx.int32), kept)


def _read_back(done: _Queued, cursor: _Cursor, cache, pending: _Queued | None, policy, stats, since: float):
    """The round's one host sync: read `done` back, tell the policy and the statistics, and
    tighten what the host knows of the positions after it. Returns its tokens
    [(token, from_draft)]."""
    values = done.outcome.tolist()  # [drafts..., kept, follow]; a plain step's [follow]
    drafted, m, follow = values[: done.k], values[done.k] if done.k else 0, values[-1]
    stats.record(done.k, m)
    if done.k:
        policy.observe(done.k, m)
    # Its time, reported only where the pipeline was full around it (queued behind the round
    # read back at `since`, with the next one queued behind it): since that read-back, as the
    # device ran the two back to back. Not reported: a round queued into an empty pipeline or
    # drained with nothing behind it (the host's own latency, or its time away, in the
    # interval), and a plain step queued behind a drafting round (it reads a masked cache:
    # not what a plain token costs).
    if done.behind and pending is not None and (done.k or done.exact):
        policy.observe_time(done.k, time.perf_counter() - since)
    after = done.start + m + 1  # where the next round started
    if pending is None:
        # Nothing queued after `done`: the cursor and the caches become exact again.
        cursor.position = cursor.low = cursor.high = after
        if done.k:  # a plain step's token went into the history when it was queued
            cursor.history = _extended(cursor.history, drafted[:m] + [follow])
        for c in cache:
            c.seek(after)
    else:
        pending.start = after
        cursor.low, cursor.high = after + 1, after + pending.k + 1
        if pending.k == 0:
            cursor.position = after + 1  # behind a plain step the position is known exactly
        for c in cache:
            c.seek(cursor.position, cursor.low, cursor.high)
    return [(t, True) for t in drafted[:m]] + [(follow, False)]


def plain_tokens(
    target: Target,
    prompt: mx.array,
    cache: list,
    *,
    sampling: Sampling = GREEDY,
    key: mx.array | None = None,
    context: Sequence[int] = (),
    stats: DraftStats | None = None,
) -> Iterator[tuple[int, bool]]:
    """Plain decoding (greedy, or sampled as `sampling` says), pipelined as mlx-lm's
    generate_step: the next forward is queued (async_eval) before the host waits for the
    current token. Yields (token, False) forever. The baseline the speculative loop is held to."""
    stats = DraftStats() if stats is None else stats
    start = cache[0].offset
    cursor, first = _start(target, prompt, cache, sampling, key, context)
    try:
        key = cursor.key

        def step(token: mx.array, history: mx.array | None) -> tuple[mx.array, mx.array | None]:
            """Queue the forward after `token` [1, 1]: the next token [1, 1] and its history."""
            nonlocal key
            key, pick_key = _split(key)
            logits = sampling.process(target.logits(target(token, cache))[0], history)
            following = sampling.pick(logits, pick_key)[None]
            mx.async_eval(following)
            return following, _extended(history, following[0])

        token, history = step(cursor.token, cursor.history)  # runs while the caller takes the first
        cursor.generated += 1
        yield first, False
        while True:
            following = step(token, history)
            stats.record(0, 0)
            cursor.generated += 1  # counted before the yield: a stop there has received it
            yield token.item(), False
            token, history = following
    finally:
        settle(cache, start, prompt.shape[1], cursor.generated)
