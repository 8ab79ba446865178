"""The speculative loop: draft from the last accepted position, verify in one target forward,
keep the agreeing prefix plus the target's own next token, rewind the rejected tail.

Token generators here yield `(token, from_draft)` forever; the caller stops iterating (stop id,
max tokens, a UI's stop button). Whenever they stop, the cache is left holding the prompt and
every yielded token but the last (mlx-lm's convention: the last token is the next input), so
the next turn can continue from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from .drafter import Drafter
from .target import Target

MAX_DRAFT = 16  # longest draft a round may use; sliding caches keep this much room
PREFILL_CHUNK = 512  # prompt positions per prefill forward, to bound activation memory


@dataclass(frozen=True, kw_only=True)
class DraftRequest:
    """What a round's proposer drafts from."""

    token: mx.array  # [1, 1] last accepted token; not in the cache yet
    hidden: mx.array  # [1, 1, hidden] target hidden state (after the final norm) that predicted it
    position: int  # position of `token`; the cache holds positions 0 .. position-1
    generated: int  # tokens yielded before this round (scripted proposers index by it)
    k: int  # how many tokens to draft


# A proposer returns k draft tokens, [1, k] int, lazily (no host sync).
Proposer = Callable[[DraftRequest, list], mx.array]


@dataclass
class DraftStats:
    """Running counts of one generation, filled in by `speculative_tokens`."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)


def drafter_proposer(drafter: Drafter, target: Target) -> Proposer:
    """Greedy drafts from an MTP drafter reading the target cache's K/V in place."""

    def propose(request: DraftRequest, cache: list) -> mx.array:
        shared_kv = {kind: cache[layer].view() for kind, layer in target.kv_producers.items()}
        token, hidden = request.token, request.hidden
        drafts = []
        for _ in range(request.k):
            inputs = mx.concatenate([target.embed(token), hidden], axis=-1)
            h, hidden = drafter(inputs, shared_kv, request.position)
            token = drafter.greedy_token(h)  # [1, 1]
            drafts.append(token)
        return mx.concatenate(drafts, axis=1)

    return propose


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
    the last, whatever state a round was in (a stop inside an accepted run, an exception
    mid-forward)."""
    for c in cache:
        c.trim(c.offset - (start + prompt_len + max(yielded, 1) - 1))


def greedy(target: Target, hidden: mx.array) -> mx.array:
    return mx.argmax(target.logits(hidden), axis=-1)


def speculative_tokens(
    target: Target,
    prompt: mx.array,
    cache: list,
    propose: Proposer,
    num_draft: int,
    max_tokens: int,
    stats: DraftStats,
) -> Iterator[tuple[int, bool]]:
    """Greedy speculative decoding: yields (token, from_draft), one host sync per round.

    Output equals plain greedy decoding of `target`: a draft is kept only where it equals the
    target's argmax at that position.
    """
    start = cache[0].offset  # a reused cache continues where it stands
    hidden = prefill(target, prompt, cache)
    token = greedy(target, hidden)
    position = start + prompt.shape[1]  # of `token`; the cache holds 0 .. position-1
    emitted = [(token.item(), False)]  # this round's tokens; all but the last are in the cache
    generated = 0  # tokens yielded
    try:
        while True:
            for item in emitted:
                generated += 1  # counted before the yield: a stop there has received it
                yield item
            k = min(num_draft, max_tokens - generated - 1)
            drafts = mx.zeros((1, 0), mx.int32)
            if k > 0:
                request = DraftRequest(token=token, hidden=hidden, position=position, generated=generated, k=k)
                drafts = propose(request, cache).astype(mx.int32)
            k = max(k, 0)
            verify_hidden = target(mx.concatenate([token, drafts], axis=1), cache)  # [1, k+1, H]
            checked = greedy(target, verify_hidden).astype(mx.int32)  # target's argmax per row
            both = mx.concatenate([drafts, checked], axis=1)[0].tolist()  # the round's one sync
            drafted, targets = both[:k], both[k:]
            m = 0
            while m < k and drafted[m] == targets[m]:
                m += 1
            rewind(cache, k - m)
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += m
            stats.accepted_per_round.append(m)
            emitted = [(t, True) for t in drafted[:m]] + [(targets[m], False)]
            token = checked[:, m : m + 1]
            hidden = verify_hidden[:, m : m + 1]
            position += m + 1
    finally:
        settle(cache, start, prompt.shape[1], generated)


def plain_tokens(target: Target, prompt: mx.array, cache: list) -> Iterator[tuple[int, bool]]:
    """Plain greedy decoding, pipelined as mlx-lm's generate_step: the next forward is queued
    (async_eval) before the host waits for the current token."""
    start = cache[0].offset
    token = greedy(target, prefill(target, prompt, cache))
    mx.async_eval(token)
    generated = 0
    try:
        while True:
            next_token = greedy(target, target(token, cache))
            mx.async_eval(next_token)
            generated += 1
            yield token.item(), False
            token = next_token
    finally:
        settle(cache, start, prompt.shape[1], generated)
