"""A speculative round for a batch of rows: draft from each row's last accepted token, verify
every row's drafts in one target forward, keep what the acceptance rule keeps plus one token of
the target's own, and move each row to just after what it kept.

Greedy rows keep a draft only where it equals the target's argmax, so they emit the target's own
greedy output. Sampled rows draw their drafts from the drafter's q and are judged by
`sample.judge`, so every token is distributed as the target's p. A round may draft nothing
(k = 0): it is then one step of plain decoding for every row.

Everything a round needs from the one before (how many drafts each row kept, the token after
them, its hidden state, each row's position) stays on the device, so round r+1 can be queued
before the host reads round r back (`engine.py` does): the host's graph building overlaps the
device's work, and a round costs one host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import MAX_WRITE, Cache
from .drafter import Drafter, compiled_step
from .sample import DRAFT, PICK, Sampling, categorical, filtered_log_probs, judge, keeps
from .target import Target

MAX_DRAFT = 16  # the longest draft a round may use; the caches' rewind room fits its verify


@dataclass
class Rows:
    """The rows of a batch as the next round starts from them: each row's last emitted token
    (not in the cache yet) at its cache position, and the hidden state that predicted it."""

    ids: list[int]  # the rows' ids, in batch order
    cache: Cache
    token: mx.array  # [B, 1] int32
    hidden: mx.array  # [B, 1, H] the target's hidden state (after its final norm) that predicted `token`
    settings: list[Sampling]  # each row's sampling, seed included
    seeds: mx.array  # [B, 2] uint32: each row's random-number seed
    # Each row's every token so far (`token` last), where its logits processors need them; else None.
    histories: list[mx.array | None] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.settings)

    @property
    def processors(self) -> bool:
        return any(s.processors for s in self.settings)

    def take(self, keep: list[int]) -> Rows:
        """These rows (batch indices), in this order."""
        index = mx.array(keep, dtype=mx.int32)
        return Rows(
            ids=[self.ids[i] for i in keep],
            cache=self.cache.take(keep),
            token=mx.take(self.token, index, axis=0),
            hidden=mx.take(self.hidden, index, axis=0),
            settings=[self.settings[i] for i in keep],
            seeds=mx.take(self.seeds, index, axis=0),
            histories=[self.histories[i] for i in keep],
        )

    @staticmethod
    def join(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        return Rows(
            ids=[i for p in parts for i in p.ids],
            cache=Cache.join([p.cache for p in parts]),
            token=mx.concatenate([p.token for p in parts]),
            hidden=mx.concatenate([p.hidden for p in parts]),
            settings=[s for p in parts for s in p.settings],
            seeds=mx.concatenate([p.seeds for p in parts]),
            histories=[h for p in parts for h in p.histories],
        )


@dataclass(frozen=True, kw_only=True)
class Draft:
    """A proposer's k drafts per row and the distribution q they were drawn from, lazily.

    q is needed only for sampled rows. None means the drafts are deterministic given the rows
    (greedy drafts, scripted or replayed tokens): q is then a point mass on each, which the
    acceptance rule handles exactly. A proposer that substitutes tokens must either keep them
    drawn from q or set q to None.
    """

    tokens: mx.array  # [B, k] int32
    q: mx.array | None = None  # [B, k, N] float32 probabilities each draft was drawn from
    q_ids: mx.array | None = None  # [B, k, N] distinct token ids of q's columns; None: N = vocab


# A proposer drafts k tokens for every row, reading the target cache in place (never writing it).
Proposer = Callable[[Rows, int], Draft]


def drafter_proposer(drafter: Drafter, target: Target) -> Proposer:
    """Drafts from an MTP drafter reading the target cache's K/V in place: each row greedy, or
    sampled from its q after its own settings, at its own position."""
    greedy_step = compiled_step(drafter, target.embed, drafter.greedy_token)  # the head inside
    forward = compiled_step(drafter, target.embed)

    def propose(rows: Rows, k: int) -> Draft:
        shared_kv = rows.cache.views(target.kv_producers, rows.hidden.dtype)
        position = rows.cache.positions.offset  # [B]: a row drafts at the position of its token
        token, hidden, histories = rows.token, rows.hidden, list(rows.histories)
        tokens, qs, ids = [], [], []
        for i in range(k):
            if rows.greedy and not rows.processors:
                token, hidden = greedy_step(token, hidden, position, shared_kv)
            else:
                h, hidden = forward(token, hidden, position, shared_kv)
                token, q, q_ids = _draft_step(drafter, h, rows, position + 1 + i, histories)
                qs.append(q)
                ids.append(q_ids)
                histories = [
                    a if a is None else mx.concatenate([a, token[b]]) for b, a in enumerate(histories)
                ]
            tokens.append(token)
        sampled = not rows.greedy
        return Draft(
            tokens=mx.concatenate(tokens, axis=1),
            q=mx.stack(qs, axis=1) if sampled else None,
            q_ids=mx.stack(ids, axis=1) if sampled and ids[0] is not None else None,
        )

    return propose


def _draft_step(drafter: Drafter, h: mx.array, rows: Rows, positions: mx.array, histories) -> tuple:
    """One draft token per row [B, 1] from drafter states h [B, 1, h], with the q it was drawn
    from [B, N] and q's token ids [B, N] (None when every row is greedy; ids None when the
    head spans the vocabulary). positions [B]: where each draft will stand."""
    if drafter.config.use_ordered_embeddings:
        # Logits processors need a vocabulary-wide row; the clustered head's q goes without
        # them (still exact: q only has to be what the draft was drawn from).
        if rows.greedy:
            return drafter.greedy_token(h), None, None
        ids, logits = drafter.candidate_logits(h)  # [B, 1, N] each
        index, q = _choose(logits, rows, positions)
        return mx.take_along_axis(ids[:, 0], index[:, None], axis=-1), q, ids[:, 0]
    logits = drafter.logits(h)  # [B, 1, V]
    if rows.processors:
        logits = _processed(logits, rows, histories, None)
    if rows.greedy:
        return mx.argmax(logits[:, 0], axis=-1, keepdims=True).astype(mx.int32), None, None
    index, q = _choose(logits, rows, positions)
    return index[:, None], q, None


def _choose(logits: mx.array, rows: Rows, positions: mx.array) -> tuple[mx.array, mx.array]:
    """Per row of logits [B, 1, N]: the index drawn (greedy rows: the argmax) [B] and the
    distribution q it was drawn from [B, N] (a greedy row's q is never read)."""
    logq = filtered_log_probs(logits, rows.settings)  # [B, 1, N]
    drawn = categorical(logq, rows.seeds, positions[:, None], DRAFT)[:, 0]
    return _where_greedy(rows, mx.argmax(logits[:, 0], axis=-1), drawn), mx.exp(logq[:, 0])


def _where_greedy(rows: Rows, greedy: mx.array, sampled: mx.array) -> mx.array:
    """Per row (first axis), the greedy value for greedy rows and the sampled one for the rest."""
    if not any(s.greedy for s in rows.settings):
        return sampled
    mask = mx.array([s.greedy for s in rows.settings]).reshape((-1,) + (1,) * (sampled.ndim - 1))
    return mx.where(mask, greedy.astype(sampled.dtype), sampled)


def _processed(logits: mx.array, rows: Rows, histories: list, drafts: mx.array | None) -> mx.array:
    """Each row's logits processors on its rows of logits [B, L, V], row i after the first i
    drafts [B, L-1]."""
    if not rows.processors:
        return logits
    out = []
    for b, (s, history) in enumerate(zip(rows.settings, histories)):
        out.append(s.process(logits[b], history, None if drafts is None else drafts[b]))
    return mx.stack(out)


# ---------------------------------------------------------------------------------------------
# A round


@dataclass
class Queued:
    """A round (k = 0: a plain step) queued on the device and not read back yet."""

    k: int
    ids: list[int]  # its rows, in batch order
    # Each row's position of the token the round fed, where the host knows it (None: behind an
    # unread drafting round; the read-back of that one fills it in).
    starts: list[int | None]
    behind: bool  # queued while another round was in flight (its time is then a full pipeline's)
    # [B, k + 2] int32: the drafts, how many each row keeps, the token after them; a plain
    # step's [B, 1]: its token. Built and scheduled with the round, so reading it waits for
    # this round only.
    outcome: mx.array
    # Where logprobs were asked: the chosen tokens' [B, k+1], the top ids [B, k+1, n] and their
    # logprobs [B, k+1, n] (log-softmax of the processed logits, before temperature).
    logprobs: tuple[mx.array, mx.array, mx.array] | None = None
    built: float = 0.0  # seconds the host took to choose and build it (set by the engine)
    # A plain step with a shadow: [B] int32, 1 where the drafter's one draft beside it would have
    # been kept (judged as a round of k = 1 would judge it); nothing of it is emitted.
    shadow: mx.array | None = None

    def read(self) -> list[tuple[list[int], int]]:
        """The host sync: each row's (tokens, drafts kept): drafts[:m] + [follow]."""
        values = self.outcome.tolist()
        if not self.k:
            return [([row[0]], 0) for row in values]
        return [(row[: row[self.k]] + [row[-1]], row[self.k]) for row in values]

    def read_shadow(self) -> list[int] | None:
        """Each row's shadow verdict (1: its draft would have been kept); None without a shadow."""
        return None if self.shadow is None else self.shadow.tolist()


def queue_round(
    target: Target,
    propose: Proposer,
    rows: Rows,
    k: int,
    *,
    behind: bool,
    top: int | None,
    shadow: bool = False,
) -> Queued:
    """Draft k per row (none when k = 0) and verify them in one forward, all on the device:
    each row's outcome stays there; `rows` (token, hidden, cache positions) move to where
    the next round starts. top: logprobs with this many alternatives (None: no logprobs).
    shadow (k = 0): the drafter also drafts one token per row, from where the step starts, and
    the step's logits judge it (`Queued.shadow`); the step's own token is plain decoding's."""
    cache = rows.cache
    p = cache.positions
    starts = [lo if lo == hi else None for lo, hi in zip(p.low, p.high)]
    low, high, start = list(p.low), list(p.high), p.offset
    shadowed = None
    if k:
        draft = propose(rows, k)
        drafts = draft.tokens.astype(mx.int32)  # [B, k]
        # The device drafts while the host builds the verify graph (not a sync: nothing waits).
        mx.async_eval(drafts, *(a for a in (draft.q, draft.q_ids) if a is not None))
        hidden = target(mx.concatenate([rows.token, drafts], axis=1), cache)  # [B, k+1, H]
        logits = _processed(target.logits(hidden), rows, rows.histories, drafts)  # [B, k+1, V]
        kept, follow = _accept(logits, drafts, draft, rows, start + 1)
        rows.hidden = mx.take_along_axis(hidden, kept[:, None, None], axis=1)
        outcome = mx.concatenate([drafts, kept[:, None], follow[:, None]], axis=1)
        chosen = mx.where(mx.arange(k + 1)[None] < kept[:, None], outcome[:, : k + 1], follow[:, None])
        cache.seek(start + kept + 1, [v + 1 for v in low], [v + k + 1 for v in high])
    else:  # a plain step: the next token as plain decoding picks it
        draft = propose(rows, 1) if shadow else None  # reads the cache before the step writes it
        rows.hidden = target(rows.token, cache)  # [B, 1, H]
        logits = _processed(target.logits(rows.hidden), rows, rows.histories, None)  # [B, 1, V]
        follow = pick(logits, rows, start + 1)
        shadowed = None if draft is None else _shadow_kept(logits, draft, rows, start + 1)
        outcome = chosen = follow[:, None]
        # Its one token is known to follow, read or not: histories can take it now, so the next
        # round can be queued behind this one even with logits processors.
        rows.histories = [
            h if h is None else mx.concatenate([h, follow[b : b + 1]]) for b, h in enumerate(rows.histories)
        ]
    rows.token = follow[:, None]
    logprobs = None if top is None else log_probs_of(logits, chosen, top)
    shadows = () if shadowed is None else (shadowed,)
    mx.async_eval(outcome, rows.token, rows.hidden, cache.positions.offset, *(logprobs or ()), *shadows)
    return Queued(
        k=k,
        ids=list(rows.ids),
        starts=starts,
        behind=behind,
        outcome=outcome,
        logprobs=logprobs,
        shadow=shadowed,
    )


def _shadow_kept(logits: mx.array, draft: Draft, rows: Rows, first: mx.array) -> mx.array:
    """[B] int32: 1 where a row's one draft would be kept by the round's rule, judged by the
    target's processed logits [B, 1, V] at its position `first` [B]."""
    drafts = draft.tokens.astype(mx.int32)  # [B, 1]
    kept = drafts[:, 0] == mx.argmax(logits[:, 0], axis=-1).astype(mx.int32)
    if not rows.greedy:
        p = mx.exp(filtered_log_probs(logits, rows.settings).astype(mx.float32))
        judged = keeps(p, drafts, draft.q, draft.q_ids, rows.seeds, first)[:, 0]
        kept = _where_greedy(rows, kept, judged)
    return kept.astype(mx.int32)


def _accept(logits, drafts, draft: Draft, rows: Rows, first: mx.array) -> tuple[mx.array, mx.array]:
    """How many drafts each row keeps and the token after them, both [B] int32 on the device.

    logits: [B, k+1, V] the target's processed logits at the drafted positions and the next;
    first [B]: each row's position of its first draft."""
    k = drafts.shape[1]
    targets = mx.argmax(logits, axis=-1).astype(mx.int32)  # the target's own token per position
    keeps, follows = drafts == targets[:, :k], targets
    if not rows.greedy:
        logp = filtered_log_probs(logits, rows.settings)
        judged, drawn = judge(logp, drafts, draft.q, draft.q_ids, rows.seeds, first)
        keeps, follows = _where_greedy(rows, keeps, judged), _where_greedy(rows, follows, drawn)
    kept = mx.sum(mx.cumprod(keeps.astype(mx.int32), axis=1), axis=1)  # drafts before the first rejection
    return kept, mx.take_along_axis(follows, kept[:, None], axis=1)[:, 0]


def pick(logits: mx.array, rows: Rows, positions: mx.array) -> mx.array:
    """Each row's next token [B] int32 from processed logits [B, 1, V], drawn for the token at
    `positions` [B] (greedy rows: the argmax)."""
    best = mx.argmax(logits[:, 0], axis=-1).astype(mx.int32)
    if rows.greedy:
        return best
    drawn = categorical(filtered_log_probs(logits, rows.settings), rows.seeds, positions[:, None], PICK)[:, 0]
    return _where_greedy(rows, best, drawn)


def log_probs_of(logits: mx.array, chosen: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array]:
    """logits [B, L, V] -> the log-softmax at the chosen tokens [B, L], and the `top` best ids
    [B, L, top] with their log-softmax, best first."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    at_chosen = mx.take_along_axis(lp, chosen[..., None], axis=-1)[..., 0]
    if not top:
        empty = mx.zeros(chosen.shape + (0,))
        return at_chosen, empty.astype(mx.int32), empty
    best = mx.argpartition(-lp, kth=top - 1, axis=-1)[..., :top]
    values = mx.take_along_axis(lp, best, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return at_chosen, mx.take_along_axis(best, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def prefill(target: Target, tokens: list[int], cache: Cache, chunk: int = MAX_WRITE) -> mx.array:
    """Run `tokens` through the target for a one-row cache, in chunks; the last position's hidden
    state [1, 1, H] (lazily)."""
    hidden = None
    for start in range(0, len(tokens), chunk):
        hidden = target(mx.array([tokens[start : start + chunk]], dtype=mx.int32), cache)
        if start + chunk < len(tokens):
            mx.eval(cache.state)  # bound the graph: one chunk's activations at a time
    return hidden[:, -1:]
