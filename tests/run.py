"""One runner for the tests: requests through the engine, outputs and statistics back."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.engine import Engine, Event, Request
from mlx_gemma_mtp.sample import GREEDY, Sampling
from mlx_gemma_mtp.speculative import Draft, Rows
from tests.fixtures import VOCAB_SIZE


@dataclass
class Output:
    """One request's tokens and its events."""

    tokens: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    @property
    def usage(self):
        return self.events[-1].usage

    @property
    def kept_per_round(self) -> list[int]:
        """Drafts each event's round kept (an event is one row's share of one round)."""
        return [sum(e.from_draft) for e in self.events[1:]]


def decode(
    model,
    drafter,
    prompts: list[list[int]],
    k,
    max_tokens: int | list[int] = 40,
    *,
    sampling: Sampling | list[Sampling] = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
    max_batch: int | None = None,
    propose=None,
    logprobs: int | None = None,
    on_step=None,
) -> list[Output]:
    """Every prompt through one engine (one batch of max_batch rows, default all); `on_step(engine,
    step, rids)` runs before each step (to add or cancel rows)."""
    engine = Engine(model, drafter, num_draft_tokens=k, max_batch=max_batch or len(prompts), propose=propose)
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    rids = [
        engine.add(Request(prompt=p, max_tokens=n, sampling=s, stop_ids=stop_ids, logprobs=logprobs))
        for p, n, s in zip(prompts, limits, settings)
    ]
    outputs: dict[int, Output] = {}
    for step in itertools.count():
        if on_step is not None:
            on_step(engine, step, rids)
        if not engine.busy:
            break
        for event in engine.step():
            out = outputs.setdefault(event.rid, Output())
            out.tokens += event.tokens
            out.events.append(event)
    return [outputs[rid] for rid in sorted(outputs)]


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [[2] + rng.randint(4, VOCAB_SIZE, size=n - 1).tolist() for n in lengths]


def scripted(continuations: list[list[int]], prompt_lens: list[int], accept_lengths):
    """Proposals that are each row's known continuation with exactly one miss per round, at the
    index given by the next accept length (k or more: no miss, a full accept and its bonus).
    Rows are the requests in the order they were added (row id = index)."""
    lengths = itertools.cycle(accept_lengths)
    width = max(len(c) for c in continuations)
    table = mx.array([c + [0] * (width - len(c)) for c in continuations], dtype=mx.int32)
    base = mx.array(prompt_lens, dtype=mx.int32)

    def propose(rows: Rows, k: int) -> Draft:
        ids = mx.array(rows.ids, dtype=mx.int32)
        # A row's token at position p is continuation[p - prompt_len]; its drafts stand after it.
        index = rows.cache.positions.offset - mx.take(base, ids) + 1
        index = mx.clip(index[:, None] + mx.arange(k), 0, width - 1)
        drafts = mx.take_along_axis(mx.take(table, ids, axis=0), index, axis=1)
        miss = min(next(lengths), k)
        if miss < k:
            wrong = (drafts[:, miss] + 1) % VOCAB_SIZE
            drafts = mx.concatenate([drafts[:, :miss], wrong[:, None], drafts[:, miss + 1 :]], axis=1)
        return Draft(tokens=drafts)

    return propose
