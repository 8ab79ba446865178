"""Test doubles of the batched engine's interface (the lead's `mlx_gemma_mtp.engine`, specified
in ENGINE.md), for the server's tests.

`ScriptedEngine` replays a fixed token script in chunks of varying size, as speculation
delivers them: the server's parsing of Gemma 4's reasoning and tool-call markers is tested
on it, independently of what a tiny random model would say.

Until the real engine is on main, `install()` also provides a plain-decoding `Engine` (greedy
rows, one token per step, exact logprobs) under the real module's name.
"""

from __future__ import annotations

import itertools
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_gemma_mtp import sample


@dataclass(frozen=True, kw_only=True)
class Request:
    prompt: Sequence[int]
    max_tokens: int
    sampling: sample.Sampling = sample.GREEDY
    stop_ids: frozenset[int] | None = None
    logprobs: int | None = None


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    drafted: int
    accepted: int
    rounds: int


@dataclass(frozen=True, kw_only=True)
class Event:
    rid: int
    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]
    logprobs: tuple[float, ...] | None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None
    finish_reason: str | None
    usage: Usage


@dataclass
class _Row:
    rid: int
    request: Request
    out: list[int] = field(default_factory=list)
    cache: list | None = None
    logits: mx.array | None = None  # [V] after the last token fed


def _check(request: Request, vocab: int, context: int) -> None:
    if not request.prompt:
        raise ValueError("prompt is empty")
    if any(not 0 <= t < vocab for t in request.prompt):
        raise ValueError(f"prompt token ids outside the vocabulary (0..{vocab - 1})")
    if len(request.prompt) + request.max_tokens > context:
        raise ValueError(
            f"prompt ({len(request.prompt)}) + max_tokens ({request.max_tokens}) exceeds the context ({context})"
        )
    if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens!r}")
    if request.logprobs is not None and not 0 <= request.logprobs <= 20:
        raise ValueError("logprobs must be in 0..20")


class _Rows:
    """Row bookkeeping both doubles share: ids, waiting, cancellation, the batch limit."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.rows: dict[int, _Row] = {}
        self.waiting: list[_Row] = []
        self.cancelled: set[int] = set()
        self._ids = itertools.count()

    def add(self, request: Request) -> int:
        self.check(request)
        row = _Row(next(self._ids), request)
        self.waiting.append(row)
        return row.rid

    def cancel(self, rid: int) -> None:
        self.cancelled.add(rid)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self.cancelled)

    def step(self) -> list[Event]:
        events = []
        for rid in sorted(self.cancelled):
            row = self.rows.pop(rid, None) or next((r for r in self.waiting if r.rid == rid), None)
            if row is not None:
                self.waiting = [r for r in self.waiting if r.rid != rid]
                events.append(self._event(row, (), None, "cancelled"))
        self.cancelled.clear()
        while self.waiting and len(self.rows) < self.max_batch:
            row = self.waiting.pop(0)
            self.start(row)
            self.rows[row.rid] = row
        for row in list(self.rows.values()):
            event = self.advance(row)
            if event.finish_reason:
                del self.rows[row.rid]
            events.append(event)
        return events

    def _event(self, row: _Row, tokens, logprobs, finish, top=None) -> Event:
        usage = Usage(
            prompt_tokens=len(row.request.prompt), cached_tokens=0, generation_tokens=len(row.out),
            drafted=0, accepted=0, rounds=len(row.out),
        )  # fmt: skip
        return Event(
            rid=row.rid, tokens=tuple(tokens), from_draft=(False,) * len(tokens), logprobs=logprobs,
            top_logprobs=top, finish_reason=finish, usage=usage,
        )  # fmt: skip

    def finish(self, row: _Row, token: int, stop_ids) -> str | None:
        if token in stop_ids:
            return "stop"
        return "length" if len(row.out) >= row.request.max_tokens else None


class Engine(_Rows):
    """Plain greedy decoding, one token per row per step, exact logprobs (the interim double)."""

    def __init__(self, model, drafter=None, *, num_draft_tokens="auto", max_batch=8, prefix_cache_size=0):
        super().__init__(max_batch)
        self.model = model

    def check(self, request: Request) -> None:
        _check(request, self.model.args.vocab_size, self.model.args.max_position_embeddings)
        if not request.sampling.greedy:
            raise ValueError("the interim engine double decodes greedily only")

    def start(self, row: _Row) -> None:
        row.cache = self.model.make_cache(room=1)
        self._feed(row, list(row.request.prompt))

    def _feed(self, row: _Row, ids: list[int]) -> None:
        hidden = self.model(mx.array([ids], dtype=mx.int32), row.cache)
        row.logits = self.model.logits(hidden[:, -1:])[0, 0].astype(mx.float32)

    def advance(self, row: _Row) -> Event:
        logp = row.logits - mx.logsumexp(row.logits)
        token = int(mx.argmax(logp).item())
        row.out.append(token)
        logprobs = top = None
        n = row.request.logprobs
        if n is not None:
            logprobs = (float(logp[token].item()),)
            order = mx.argsort(-logp)[:n].tolist()
            top = (tuple((t, float(logp[t].item())) for t in order),)
        stop_ids = row.request.stop_ids or frozenset(self.model.config.stop_ids)
        finish = self.finish(row, token, stop_ids)
        if finish is None:
            self._feed(row, [token])
        return self._event(row, (token,), logprobs, finish, top)


class ScriptedEngine(_Rows):
    """Answers every request with `script` (token ids), `chunks[i % len]` tokens per step; the
    prompts it got are in `prompts`. A script ending in one of `stop_ids` finishes "stop"."""

    def __init__(
        self, script: Sequence[int], stop_ids: Sequence[int], chunks=(1, 3, 2, 4), delay=0.0, gate=None
    ):
        super().__init__(max_batch=8)
        self.script, self.stop_ids, self.chunks = list(script), frozenset(stop_ids), chunks
        self.delay = delay  # seconds per step, as a model's forward would take
        self.gate = gate  # a threading.Event: no row advances while it is clear
        self.prompts: list[list[int]] = []

    def step(self) -> list[Event]:
        if self.gate is not None and not self.gate.wait(0.01):
            return []
        time.sleep(self.delay)
        return super().step()

    def check(self, request: Request) -> None:
        _check(request, 512, 4096)

    def start(self, row: _Row) -> None:
        self.prompts.append(list(row.request.prompt))
        row.cache = 0  # steps taken

    def advance(self, row: _Row) -> Event:
        size = self.chunks[row.cache % len(self.chunks)]
        row.cache += 1
        tokens = self.script[len(row.out) : len(row.out) + size][: row.request.max_tokens - len(row.out)]
        row.out += tokens
        finish = self.finish(row, tokens[-1], self.stop_ids) if tokens else "length"
        if finish is None and len(row.out) == len(self.script):
            finish = "length"
        return self._event(row, tokens, None, finish)


def install() -> None:
    """Make `mlx_gemma_mtp.engine` importable (this double) while the real one is not on the branch,
    and let `make_sampling` take the seed the real one takes."""
    try:
        import mlx_gemma_mtp.engine  # noqa: F401
    except ImportError:
        module = types.ModuleType("mlx_gemma_mtp.engine")
        module.Engine, module.Request, module.Event, module.Usage = Engine, Request, Event, Usage
        sys.modules["mlx_gemma_mtp.engine"] = module
        make = sample.make_sampling

        def make_sampling(*args, seed=None, **kwargs):
            return make(*args, **kwargs)

        sample.make_sampling = make_sampling
