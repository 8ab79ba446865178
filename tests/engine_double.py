"""A scripted stand-in for the batched engine (`mlx_gemma_mtp.engine.Engine`'s interface), for
the server's tests of what does not depend on the model.

`ScriptedEngine` answers every request with a fixed token script, in chunks of varying size as
speculation delivers them: the server's parsing of Gemma 4's reasoning and tool-call markers is
tested on it, whatever a tiny random model would say. `gate` holds every row (back-pressure),
`delay` makes steps take time (shutdown).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mlx_gemma_mtp.engine import Event, Request, Usage, check_request


@dataclass
class _Row:
    rid: int
    request: Request
    out: list[int]
    steps: int = 0


class ScriptedEngine:
    """Every request's answer is `script` (capped at its max_tokens), `chunks[i % len]` tokens
    at its i-th step; a script ending in one of `stop_ids` finishes "stop". The prompts it got
    are in `prompts`. Requests are checked against `model` as the real engine checks them."""

    def __init__(
        self, model, script: Sequence[int], stop_ids: Sequence[int], chunks=(1, 3, 2, 4), delay=0.0, gate=None
    ):
        self.model, self.script, self.stop_ids, self.chunks = model, list(script), frozenset(stop_ids), chunks
        self.delay = delay  # seconds per step, as a model's forward would take
        self.gate = gate  # a threading.Event: no row advances while it is clear
        self.prompts: list[list[int]] = []
        self.max_batch = 8
        self.slack = 0.0  # seconds the engine says the device stays busy without a next step
        self.device_wait = 0.0  # what the last step says it waited for the device
        self.last_round = (0, 0)  # it drafts nothing
        self._rows: dict[int, _Row] = {}
        self._cancelled: set[int] = set()
        self._ids = itertools.count()

    def check(self, request: Request) -> None:
        check_request(self.model, request)

    def add(self, request: Request) -> int:
        self.check(request)
        rid = next(self._ids)
        self._rows[rid] = _Row(rid, request, [])
        self.prompts.append(list(request.prompt))
        return rid

    def cancel(self, rid: int, keep: int | None = None) -> None:
        if rid in self._rows:
            self._cancelled.add(rid)

    @property
    def busy(self) -> bool:
        return bool(self._rows)

    @property
    def batch_size(self) -> int:
        return min(len(self._rows), self.max_batch)

    @property
    def free_rows(self) -> int:
        return max(0, self.max_batch - len(self._rows))

    def step(self) -> list[Event]:
        events = [self._event(self._rows.pop(rid), (), "cancelled") for rid in sorted(self._cancelled)]
        self._cancelled.clear()
        if self.gate is not None and not self.gate.wait(0.01):
            return events
        time.sleep(self.delay)
        for row in list(self._rows.values())[: self.max_batch]:
            size = self.chunks[row.steps % len(self.chunks)]
            row.steps += 1
            tokens = self.script[len(row.out) : len(row.out) + size][: row.request.max_tokens - len(row.out)]
            row.out += tokens
            finish = None
            if tokens and tokens[-1] in self.stop_ids:
                finish = "stop"
            elif len(row.out) in (row.request.max_tokens, len(self.script)):
                finish = "length"
            if finish:
                del self._rows[row.rid]
            events.append(self._event(row, tokens, finish))
        return events

    @staticmethod
    def _event(row: _Row, tokens, finish) -> Event:
        usage = Usage(
            prompt_tokens=len(row.request.prompt), cached_tokens=0, generation_tokens=len(row.out),
            drafted=0, accepted=0, rounds=0, draft_lengths=(),
        )  # fmt: skip
        return Event(
            rid=row.rid, tokens=tuple(tokens), from_draft=(False,) * len(tokens), logprobs=None,
            top_logprobs=None, finish_reason=finish, usage=usage,
        )  # fmt: skip
