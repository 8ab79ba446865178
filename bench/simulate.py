"""`python -m bench.simulate`: draft-length policies in a loop-faithful simulation.

The loop is `speculative.py`'s, batched (`Loop`): it chooses round r+1 before it reads round r
back, and reports a round's time only where its clock can tell (a round queued behind another,
read back with another queued behind it; never a plain step queued behind a drafting round). At
B > 1 a row that ends its conversation leaves and a new one takes its place (in a "served" case
some rounds later, in a round that also runs its prefill and goes untimed: a server's clients).
The card: rounds cost what the H100 measured (`truth`: the benchmark runs in bench/results at
B = 1, the batched surface of shared/device/README.md at B > 1, or a batch benchmark's own costs:
`BENCH`), times the card's noise (`Noise`, `Card`); the policy starts from costs measured with
their own noise (`measured`). Acceptance: a row's draft j is kept with
probability a_j once drafts 1..j-1 were (`PROFILES`), drawn per token position.

Every case runs plain decoding, each fixed k, the heuristic and auto on the same draws (of
tokens and of the card), so their ratios are paired; the table gives auto's speedup over plain
and over the best fixed k. `--rules` adds auto with each of its rules switched off (`RULES_OFF`):
docs/auto.md keeps both tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mlx_gemma_mtp.draft_length import MAX_DRAFT, Auto, Costs, DraftLength, Fixed, Heuristic, Rules

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 2, 4, 8, 16)
TOKENS = 128  # per row, as the benchmark's generations

# Median ms of one target forward of B rows x L tokens after a 1024-token context (H100, MLX 0.32.4
# CUDA, shared/device/README.md "Batched cost surface"): B -> the ms at L = 1, 2, 3, 4, 5, 8.
SURFACE_L = (1, 2, 3, 4, 5, 8)
SURFACE = {
    "E2B bf16": {
        1: (13.4, 21.2, 22.0, 21.2, 21.5, 22.3),
        2: (19.1, 21.2, 24.9, 25.6, 27.0, 25.5),
        4: (21.3, 25.3, 25.9, 22.6, 22.5, 22.2),
        8: (18.4, 23.0, 24.1, 22.8, 16.0, 15.5),
        16: (12.4, 24.4, 27.5, 23.6, 24.2, 24.7),
    },
    "E4B 4-bit": {
        1: (15.9, 19.3, 24.5, 24.4, 34.2, 33.7),
        2: (28.4, 31.6, 33.2, 29.9, 30.2, 30.0),
        4: (24.9, 32.6, 32.9, 32.2, 33.1, 31.2),
        8: (37.6, 40.1, 41.0, 39.7, 41.9, 39.7),
        16: (50.8, 51.0, 56.5, 51.3, 54.8, 57.8),
    },
    "26B-A4B 4-bit": {  # B = 16 failed in MLX CUDA
        1: (28.7, 32.1, 34.6, 30.1, 33.7, 37.6),
        2: (19.4, 36.2, 35.9, 27.6, 35.5, 33.1),
        4: (29.8, 31.4, 37.2, 40.3, 44.4, 49.2),
        8: (30.9, 43.7, 53.4, 61.0, 63.1, 82.2),
    },
    "31B 4-bit": {
        1: (33.9, 57.8, 75.2, 93.8, 107.5, 62.5),
        2: (49.4, 96.2, 125.1, 69.4, 71.1, 76.0),
        4: (86.1, 103.5, 103.3, 108.2, 103.4, 106.5),
        8: (136.7, 161.9, 159.1, 158.2, 151.1, 163.6),
        16: (239.4, 284.5, 267.8, 276.2, 268.8, 276.3),
    },
}
# The B = 1 curves over every k, timed by the loop's clock with six passes ("ideal_costs_ms").
SHAPE_RUNS = {
    "E2B bf16": "e2b-bf16-r34.json",
    "E4B 4-bit": "e4b-4bit-r41.json",
    "26B-A4B 4-bit": "26b-4bit-r39.json",
    "31B 4-bit": "31b-4bit-r40.json",
}
COMPUTE_BOUND = "compute-bound"  # synthetic: a step costs 8 ms + 2 ms per row-token
# A batch benchmark's own costs: B -> ms of a forward of B rows x L = 1, 2, ... tokens after a
# 1024-token context, and B -> ms of a drafter step. r42 (bench/results/batch-e2b-bf16-r42.json,
# H100, the run whose auto reached 66-73% of Leviathan's ideal); r46 (bench-e2b-bf16-256-b4-r46.json
# and bench-e2b-bf16-256-b1-b8-r46.json; docs/auto.md compares them).
# fmt: off
BENCH = {
    "E2B bf16 r42": {
        1: (7.6, 11.9, 11.8, 12.0, 11.8, 11.8, 11.5, 11.2, 11.2),
        4: (10.4, 11.8, 12.8, 12.8, 12.6, 12.5, 12.9, 12.0, 11.9),
        8: (10.6, 12.9, 12.1, 12.9, 12.5, 12.4, 12.2, 12.0, 11.8),
    },
    "E2B bf16 r46": {
        1: (10.9, 17.8, 18.5, 17.9, 18.4, 18.1, 16.5, 19.0, 17.7, 17.3, 17.2, 17.2, 20.1, 16.9, 18.8, 17.1, 19.5),
        4: (13.3, 15.4, 17.1, 16.6, 16.2, 16.0, 17.0, 16.9, 16.4, 17.1, 16.7, 16.4, 15.7, 16.1, 14.7, 14.5, 15.7),
        8: (22.8, 29.9, 27.6, 30.5, 27.7, 29.3, 26.5, 26.6, 26.8, 26.7, 28.8, 28.2, 28.4, 26.8, 28.0, 28.4, 28.3),
    },
}
# fmt: on
BENCH_DRAFT = {"E2B bf16 r42": {1: 0.54, 4: 0.75, 8: 0.74}, "E2B bf16 r46": {1: 1.14, 4: 0.81, 8: 1.51}}


def _surface(ms: tuple[float, ...], length: int, ls: tuple[int, ...] = SURFACE_L) -> float:
    """ms of a verify of `length` tokens per row from one surface row measured at lengths `ls`:
    linear between them, and past the last growing by the row's mean step from the first."""
    if length >= ls[-1]:
        slope = max(ms[-1] - ms[0], 0.0) / (ls[-1] - ls[0])
        return ms[-1] + slope * (length - ls[-1])
    i = next(i for i in range(1, len(ls)) if length <= ls[i])
    w = (length - ls[i - 1]) / (ls[i] - ls[i - 1])
    return ms[i - 1] + w * (ms[i] - ms[i - 1])


def truth(shape: str) -> Costs:
    """What rounds of `shape` cost on the simulated card: at B = 1 the curve its benchmark run
    timed by the loop's clock (six passes, "ideal_costs_ms"); at B > 1 the batched surface's
    forwards; a drafter step as at B = 1 (not measured batched yet; launch-bound). A `BENCH`
    shape: its batch benchmark's forwards and drafter steps at each B."""
    if shape == COMPUTE_BOUND:
        verify = tuple(tuple((8 + 2 * b * (k + 1)) * 1e-3 for k in range(MAX_DRAFT + 1)) for b in BATCHES)
        return Costs(batches=BATCHES, verify=verify, draft=(0.5e-3,) * len(BATCHES))
    if shape in BENCH:
        rows, draft = BENCH[shape], BENCH_DRAFT[shape]
        verify = tuple(
            tuple(
                _surface(rows[b], k + 1, tuple(range(1, len(rows[b]) + 1))) * 1e-3
                for k in range(MAX_DRAFT + 1)
            )
            for b in rows
        )
        return Costs(batches=tuple(rows), verify=verify, draft=tuple(draft[b] * 1e-3 for b in rows))
    run = json.loads((RESULTS / SHAPE_RUNS[shape]).read_text())["results"][0]["ideal_costs_ms"]
    surface = SURFACE[shape]
    batches = tuple(sorted(surface))
    verify = [tuple(ms * 1e-3 for ms in run["verify"])]
    verify += [tuple(_surface(surface[b], k + 1) * 1e-3 for k in range(MAX_DRAFT + 1)) for b in batches[1:]]
    return Costs(batches=batches, verify=tuple(verify), draft=(run["draft"] * 1e-3,) * len(batches))


# Per-position acceptance: a_j for j = 1..MAX_DRAFT, the chance draft j is kept once 1..j-1 were.
def uniform(alpha: float) -> tuple[float, ...]:
    return (alpha,) * MAX_DRAFT


# 26B-A4B with 4 drafts on vLLM: positions kept 0.844, 0.599, 0.385, 0.271 of rounds; as chances
# given the drafts before, and the last of them held for positions 5-16.
_KEPT = (0.844, 0.599, 0.385, 0.271)
PROFILE_26B = tuple(_KEPT[min(j, 3)] / (_KEPT[min(j, 3) - 1] if j else 1.0) for j in range(MAX_DRAFT))
SWITCH_EVERY = 48  # tokens: "switching" alternates prose-like (0.9) and table-like (0.1) spans


@dataclass(frozen=True)
class Case:
    shape: str
    batch: int
    acceptance: str  # a key of PROFILES
    cold: bool = False  # kernels not compiled: the first round of each shape costs COLD_FACTOR x
    tokens: int = TOKENS  # per conversation
    queue: bool = True  # B > 1: a row that ends is replaced (False: the batch starts and ends together)
    turns: int = 1  # B = 1: conversations one after another, one policy (a chat, a server's one client)
    # B > 1, queue: the server's clients. A row that ends is replaced `served` rounds later (its
    # client's next request over HTTP), the round it joins in also runs its prompt's prefill and
    # is not timed, as the engine's (0: replaced at once, in a round timed as any).
    served: int = 0
    # The device's share of a round's cost. 1: the device bounds the rounds (the host builds the
    # next while it runs). Below 1 the host does: it builds each round in the round's cost, the
    # device then runs it in this share of it, and the loop's clock (read-back to read-back)
    # times the host building the round queued after the one it reads (E2B on an H100, r47).
    device: float = 1.0
    # Turning between plain steps and drafting costs the host more than either round: (going in,
    # coming out) in plain steps, on top of the round's cost. r49's churn (E2B bf16 B = 8, no
    # graphs): auto's k = 1 probe from plain decoding +45% of a plain step where the surface
    # says +15%, and the plain step after it +10%.
    switch: tuple[float, float] = (0.0, 0.0)

    @property
    def conversations(self) -> int:
        """Per place in the batch, in tokens: B = 1 is one generation (the benchmark's) or `turns`
        in turn, a batch serves two's worth from a queue, or one each when it is not fed."""
        if self.batch == 1:
            return self.turns
        return 2 if self.queue else 1

    @property
    def name(self) -> str:
        tail = (" cold" if self.cold else "") + (f" {self.tokens} tokens" if self.tokens != TOKENS else "")
        tail += " together" if not self.queue and self.batch > 1 else ""
        tail += f" {self.turns} in turn" if self.turns > 1 else ""
        tail += f" served (+{self.served} rounds)" if self.served else ""
        tail += f" host-bound (device {self.device:g})" if self.device < 1 else ""
        tail += f" switch +{self.switch[0]:g}/+{self.switch[1]:g}" if any(self.switch) else ""
        return f"{self.shape} B={self.batch} {self.acceptance}{tail}"


PROFILES = {
    "α 0": lambda slot, pos: uniform(0.0),
    "α 0.5": lambda slot, pos: uniform(0.5),
    "α 0.8": lambda slot, pos: uniform(0.8),
    "26B profile": lambda slot, pos: PROFILE_26B,
    "ragged": lambda slot, pos: uniform(0.9 if slot % 2 == 0 else 0.2),  # half the rows each
    "switching": lambda slot, pos: uniform(0.9 if (pos + 17 * slot) // SWITCH_EVERY % 2 == 0 else 0.1),
}
COLD_FACTOR = 5.0
# A shadow (a drafter step beside a plain step) costs the card this many drafter steps: a guess
# until the GPU times one (its host work included; docs/auto.md "Shadows").
SHADOW = 1.5
# A host-bound case's device share of a round (a guess: r47's read-backs never waited).
HOST_BOUND_DEVICE = 0.5
HOST_SWITCH = (0.3, 0.1)  # `Case.switch` as r49's churn measured it (E2B bf16, B = 8, no graphs)
PREFILL_FACTOR = 2.0  # a joining row's prompt prefill: this many one-row verifies of MAX_DRAFT drafts


@dataclass(frozen=True)
class Noise:
    """The card's spread, read off the H100 timelines (docs/auto.md): log-normal factors."""

    level: float = 0.15  # per generation (plain runs of one benchmark: 9.2-19.4 ms/token, E2B)
    drift: float = 0.08  # slow, in time (an Ornstein-Uhlenbeck process) ...
    drift_seconds: float = 1.0  # ... whose spells last about this long
    jitter: float = 0.15  # per round (a token's time: sd of its log 0.10-0.25) ...
    jitter_corr: float = 0.6  # ... correlated with the round before (lag 1: 0.5-0.7)
    hiccup: float = 0.015  # a round's chance of a hiccup (tokens over 2x the median: 0-3.7%) ...
    hiccup_size: tuple[float, float] = (1.5, 3.5)  # ... which multiplies its time by this much
    # (rounds, low, high): drafting rounds among the first `rounds` cost low-high x more. Off by
    # default; `--opening` puts in what 26B-A4B showed once (docs/auto.md).
    opening: tuple[int, float, float] = (0, 1.0, 1.0)
    measure: float = 0.10  # measured costs: per (batch, k) (loop's against the ideal's: 0.04-0.15) ...
    measure_common: float = 0.07  # ... per batch size (the card's state while measuring) ...
    measure_plain: float = 0.12  # ... and a plain step's own (0.67-1.16x between two measurements)
    measure_draft: float = 0.2  # a drafter step measured (0.57-1.07 ms against 0.83-1.03)
    host: float = 3e-3  # seconds to build and launch a round queued into an idle pipeline


QUIET = Noise(level=0, drift=0, jitter=0, hiccup=0, measure=0, measure_common=0,
              measure_plain=0, measure_draft=0)  # fmt: skip


OPENING = (6, 1.2, 1.7)  # 26B-A4B's opening rounds against its steady ones (r22-r23)
# Rounds as steady as r53's own-share timings on the H100 (E2B bf16 B = 4: the sd of a k's log
# timings within a run 0.005-0.05, where `Noise.jitter`, read off the loop's clock, is 0.15).
QUIET_ROUNDS = {"jitter": 0.02, "drift": 0.02}


class Card:
    """The factor a round's time is multiplied by: level x drift(time) x jitter(round) x a
    hiccup now and then x the opening's."""

    GRID = 0.05  # seconds between drift samples

    def __init__(self, noise: Noise, seed: int):
        # A stream per kind of noise: a policy that runs more rounds, or runs them longer, must
        # not shift the draws of another kind (every policy meets the same card).
        self.noise, rng = noise, random.Random(f"{seed} card")
        self.drift_rng, self.jitter_rng = random.Random(f"{seed} drift"), random.Random(f"{seed} jitter")
        self.level = rng.gauss(0, noise.level)
        self.opening = rng.uniform(*noise.opening[1:])  # this generation's
        self.drift = [self.drift_rng.gauss(0, noise.drift)]
        self.jitter: list[float] = []  # log factor per round, hiccups included
        self.last = self.jitter_rng.gauss(0, noise.jitter)

    def factor(self, seconds: float, round_index: int, drafting: bool) -> float:
        n = self.noise
        keep = math.exp(-self.GRID / n.drift_seconds)
        while len(self.drift) <= int(seconds / self.GRID):
            step = math.sqrt(1 - keep * keep) * self.drift_rng.gauss(0, n.drift)
            self.drift.append(keep * self.drift[-1] + step)
        c, rng = n.jitter_corr, self.jitter_rng
        while len(self.jitter) <= round_index:
            self.last = c * self.last + math.sqrt(1 - c * c) * rng.gauss(0, n.jitter)
            hiccup = rng.uniform(*n.hiccup_size) if rng.random() < n.hiccup else 1.0
            self.jitter.append(self.last + math.log(hiccup))
        opening = self.opening if drafting and round_index < n.opening[0] else 1.0
        log_factor = self.level + self.drift[int(seconds / self.GRID)] + self.jitter[round_index]
        return opening * math.exp(log_factor)


def measured(true: Costs, noise: Noise, seed: int) -> Costs:
    """What the policy is told the costs are: `true` with measurement noise."""
    rng = random.Random(seed)
    verify = []
    for row in true.verify:
        common = rng.gauss(0, noise.measure_common)
        plain = row[0] * math.exp(common + rng.gauss(0, noise.measure_plain))
        verify.append((plain, *(s * math.exp(common + rng.gauss(0, noise.measure)) for s in row[1:])))
    draft = tuple(s * math.exp(rng.gauss(0, noise.measure_draft)) for s in true.draft)
    return Costs(batches=true.batches, verify=tuple(verify), draft=draft)


@dataclass
class _Row:
    slot: int  # the batch's place it holds (a row that leaves is replaced there)
    easy: random.Random  # a draw per token position: the same for every policy
    draws: list[float] = field(default_factory=list)
    generated: int = 1  # tokens read back (the prefill's included)
    position: int = 1  # where the device stands (rounds queued included)

    def accept(self, profile, k: int) -> int:
        """Drafts kept by a round of k from `position`: its leading easy enough tokens."""
        a = profile(self.slot, self.position)
        while len(self.draws) < self.position + k:
            self.draws.append(self.easy.random())
        kept = 0
        while kept < k and self.draws[self.position + kept] < a[kept]:
            kept += 1
        return kept


@dataclass
class _Round:
    k: int
    kept: dict[int, int]  # row -> drafts kept
    behind: bool  # queued behind an unread round
    exact: bool  # queued at positions the host knew (after a plain step, or into an idle pipeline)
    end: float  # device time at which it finishes
    built: float  # host seconds spent building it
    shadow: dict[int, int] | None = None  # a plain step's shadow: row -> its one draft kept


class Loop:
    """A batch of `case.batch` rows decoding as speculative.py's loop does, one round ahead.
    Each row is a conversation of `tokens` tokens; one that ends is replaced by a new row in its
    place (an engine serving a queue: the batch stays full), until the batch has read back as
    many tokens as `case.conversations` per place make (B = 1: one generation, as the benchmark
    times it)."""

    def __init__(self, case: Case, true: Costs, card: Card, seed: int):
        self.case, self.true, self.card, self.tokens, self.seed = case, true, card, case.tokens, seed
        self.profile = PROFILES[case.acceptance]
        self.goal = case.batch * case.conversations * (self.tokens - 1)  # tokens to read back ...
        self.left = self.goal  # ... of them still to come
        self.rows: dict[int, _Row] = {}
        self.started = 0
        self.arriving: list[tuple[int, int]] = []  # (round, slot): a served row's next request
        for slot in range(case.batch):
            self._start(slot)
        self.now = 0.0  # host time
        self.device_free = 0.0  # when the device has run every round queued
        self.rounds = 0
        self.compiled: set[tuple[int, int]] = set()
        # (seconds, tokens read back) until the read-back in which a row first ended: the batch
        # benchmark's "while the batch is full" for a batch that starts together (B = 1: the
        # generation's first).
        self.full: tuple[float, int] | None = None

    def run(self, policy: DraftLength) -> float:
        """Seconds until the batch has read back every conversation's tokens."""
        pending, since, joined = None, 0.0, 0
        while self.left > 0:
            joined += self._arrivals(idle=pending is None and not self.rows)
            active = list(self.rows)
            limit = max((self._room(r, pending) for r in active), default=-1)
            if pending is not None and limit < 0:  # nothing fits behind it (or no row left): drain
                self._read_back(pending, None, policy, since)
                pending, since = None, self.now
                continue
            limit = max(limit, 0)
            k = min(policy.choose(limit, active), limit, MAX_DRAFT)
            queued, joined = self._queue(k, active, pending, joined, shadow=not k and policy.shadow()), 0
            if pending is None:
                pending = queued
                continue
            self._read_back(pending, queued, policy, since)
            pending, since = queued, self.now
        return self.now

    def _start(self, slot: int) -> None:
        row = self.started
        self.started += 1
        self.rows[row] = _Row(slot, random.Random(self.seed * 1000 + row))

    def _arrivals(self, idle: bool) -> int:
        """Served rows whose requests have come (idle: the next ones, nothing else running) join
        the round queued next; how many."""
        now = min((a[0] for a in self.arriving), default=0) if idle else self.rounds
        due = [a for a in self.arriving if a[0] <= now]
        self.arriving = [a for a in self.arriving if a[0] > now]
        for _, slot in due:
            self._start(slot)
        return len(due)

    def _room(self, row: int, pending: _Round | None) -> int:
        ahead = pending.k + 1 if pending is not None and row in pending.kept else 0
        return self.tokens - self.rows[row].generated - 1 - ahead

    def _queue(
        self, k: int, active: list[int], pending: _Round | None, joined: int = 0, shadow: bool = False
    ) -> _Round:
        kept, shadowed = {}, ({} if shadow else None)
        for r in active:
            if shadowed is not None:  # the draft a round of one from here would make: its draw
                shadowed[r] = self.rows[r].accept(self.profile, 1)
            kept[r] = self.rows[r].accept(self.profile, k) if k else 0
            self.rows[r].position += kept[r] + 1
        batch = len(active)
        seconds = self.true.round(k, batch) + joined * PREFILL_FACTOR * self.true.step(MAX_DRAFT)
        seconds += SHADOW * self.true.drafter(batch) if shadow else 0.0
        if pending is not None and (k > 0) != (pending.k > 0):  # into drafting, or out of it
            seconds += self.true.plain(batch) * self.case.switch[0 if k else 1]
        seconds *= self.card.factor(self.device_free, self.rounds, k > 0)
        if self.case.cold and (batch, k) not in self.compiled:
            seconds *= COLD_FACTOR
        self.compiled.add((batch, k))
        idle, built = (self.card.noise.host if pending is None else 0.0), 0.0  # into an idle pipeline
        if self.case.device < 1:  # the host builds every round, in its cost; the device is quicker
            self.now += seconds
            seconds, idle, built = seconds * self.case.device, 0.0, seconds
        start = max(self.device_free, self.now + idle)
        self.device_free = start + seconds
        self.rounds += 1
        exact = pending is None or pending.k == 0
        behind = pending is not None and not joined  # the engine times no round queued with a prefill
        return _Round(k, kept, behind, exact, self.device_free, built, shadow=shadowed)

    def _read_back(self, done: _Round, pending: _Round | None, policy: DraftLength, since: float) -> None:
        waited = max(done.end - self.now, 0.0)
        self.now += waited
        present = {r: m for r, m in done.kept.items() if r in self.rows}
        if done.k and present:
            policy.observe(done.k, present)
        if done.shadow is not None:  # as the engine: observed as a round of one, not timed
            policy.observe(1, {r: m for r, m in done.shadow.items() if r in self.rows})
        elif done.behind and pending is not None and (done.k or done.exact):
            policy.observe_time(done.k, len(done.kept), self.now - since, own=done.built + waited)
        ended = False
        for r, m in present.items():
            row = self.rows[r]
            made = min(m + 1, self.tokens - row.generated)
            row.generated += made
            self.left -= made
            if row.generated >= self.tokens:
                del self.rows[r]
                ended = True
                policy.forget(r)
                if self.case.queue and self.case.served:
                    self.arriving.append((self.rounds + self.case.served, row.slot))
                elif self.case.queue:
                    self._start(row.slot)
        if ended and self.full is None:  # this read-back's tokens, every row's, are the last while full
            self.full = (self.now, self.goal - self.left)


# Each of auto's rules switched off (docs/auto.md): the Rules fields that do it.
RULES_OFF = {
    "learn costs from the clock": None,  # never told a round's time: `_Untimed`
    "median of the last 9": {"timings": 1},
    "untimed scaled by the least ratio": {"scale_untimed": False},
    "untimed plain scaled down only": {"plain_down": False},
    "floor: a plain step + k drafter steps": {"floor": False},
    "first timing over 3x: a compile": {"outlier": math.inf},
    "forgetting (decay 0.98)": {"decay": 1.0},
    "per-row acceptance": {"per_row": False},
    "plain behind the blind first round": {"blind_plain": False},
    "probe stretch scaled by its cost": {"probe_share": math.inf},  # probe_first between probes
    "only a kept draft ends a stretch": {"kept_ends_stretch": False},
    "a kept draft on thin evidence: probe soon": {"thin": 0.0},
    "drafting stopped on thin evidence: probe after 2": {"thin_wait": 16},
    "a probe drafts the cheapest round": {"cheap_probe": False},
    "plain for want of room: no verdict": {"room_no_verdict": False},
    "a row that left still counts": {"remember_left": False},
    "a round timed by its own share": {"own_share": False},
    "a probe is a shadow": {"shadow_probe": False},
    "no draft kept yet: a shadow, not a round": {"shadow_opening": False},
    "shadows (both rules)": {"shadow_probe": False, "shadow_opening": False},
}


class _Untimed:
    """A policy never told what rounds took: auto on its measured costs alone."""

    def __init__(self, policy: DraftLength):
        self.choose, self.observe, self.forget = policy.choose, policy.observe, policy.forget
        self.shadow = policy.shadow

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        """Not told."""


def policies(costs: Costs, rules_off: dict[str, dict | None]) -> dict[str, DraftLength]:
    """A fresh policy of each kind for one generation."""
    out: dict[str, DraftLength] = {f"k={k}": Fixed(k) for k in range(MAX_DRAFT + 1)}
    out["heuristic"] = Heuristic()
    out["auto"] = Auto(costs)
    for name, off in rules_off.items():
        auto = Auto(costs) if off is None else Auto(costs, dataclasses.replace(Rules(), **off))
        out[f"auto - {name}"] = _Untimed(auto) if off is None else auto
    return out


class Generation(NamedTuple):
    """One policy's run of one generation: its seconds, and (seconds, tokens) while full (`Loop.full`)."""

    seconds: float
    full: tuple[float, int]


def simulate(
    case: Case, generations: int, rules_off: dict[str, dict], noise: Noise | None = None
) -> dict[str, list[Generation]]:
    """Each policy's run of each of `generations` generations (the same draws for all)."""
    true, noise = truth(case.shape), noise or Noise()
    runs: dict[str, list[Generation]] = {}
    for g in range(generations):
        told = measured(true, noise, seed=10**6 + g)
        for name, policy in policies(told, rules_off).items():
            loop = Loop(case, true, Card(noise, seed=g), seed=g)
            seconds = loop.run(policy)
            runs.setdefault(name, []).append(Generation(seconds, loop.full))
    return runs


def summary(case: Case, runs: dict[str, list[Generation]]) -> dict:
    """Speedups over plain decoding (ratios of total seconds) of auto, the heuristic and the best
    fixed k; for each rule, auto's gain from it (its speedup over auto's without the rule, - 1)
    and that gain's standard error over the generations. A batch that starts together also
    gets auto's and the best fixed k's speedups while it is full (tokens over seconds, pooled
    over the generations), as the batch benchmark reads them: `auto_full`, `best_k_full`,
    `best_fixed_full`."""
    seconds = {name: [run.seconds for run in gens] for name, gens in runs.items()}
    total = {name: sum(times) for name, times in seconds.items()}
    plain = total["k=0"]
    fixed = {k: plain / total[f"k={k}"] for k in range(MAX_DRAFT + 1)}
    best = max(fixed, key=fixed.get)
    gains = {}
    for name, times in seconds.items():
        if name.startswith("auto - "):
            ratios = [t / a for t, a in zip(times, seconds["auto"])]
            error = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else 0.0
            gains[name.removeprefix("auto - ")] = (total[name] / total["auto"] - 1, error)
    out = {
        "case": case.name,
        "auto": plain / total["auto"],
        "heuristic": plain / total["heuristic"],
        "best_k": best,
        "best_fixed": fixed[best],
        "gains": gains,
    }
    if case.batch > 1 and not case.queue:
        rate = {
            name: sum(run.full[1] for run in gens) / sum(run.full[0] for run in gens)
            for name, gens in runs.items()
        }
        full = {k: rate[f"k={k}"] / rate["k=0"] for k in range(MAX_DRAFT + 1)}
        best_full = max(full, key=full.get)
        out |= {
            "auto_full": rate["auto"] / rate["k=0"],
            "best_k_full": best_full,
            "best_fixed_full": full[best_full],
        }
    return out


def cases(batches=(1, 4, 16), switch: tuple[float, float] | None = None) -> list[Case]:
    """Every shape x batch size x acceptance (the ragged mix only in batches), α 0.8 served at
    each B > 1, then at B = 1 longer generations (where probes back off) and cold kernels
    (compiles); for a `BENCH` shape its benchmark's generations too (64 and 256 tokens, the
    batch starting and ending together; at 256 also on a host-bound card, as r47 measured, and
    on one where turning between plain steps and drafting costs more, as r49's churn did).
    `switch`: every shape's α 0, α 0.8 and 26B-profile cases again, on a host-bound card where
    turning costs that much (r58's 26B-A4B B = 1: a drafting round ~0.6 of a plain step over
    its surface price)."""
    out = []
    for shape in (*SURFACE, COMPUTE_BOUND, *BENCH):
        measured_sizes = truth(shape).batches
        if switch is not None:
            out += [
                Case(shape, b, a, device=HOST_BOUND_DEVICE, switch=switch)
                for b in batches
                if b <= measured_sizes[-1]
                for a in ("α 0", "α 0.8", "26B profile")
            ]
        for b in batches:
            if b <= measured_sizes[-1]:
                out += [Case(shape, b, a) for a in PROFILES if b > 1 or a != "ragged"]
        out += [Case(shape, b, "α 0.8", served=1) for b in batches if 1 < b <= measured_sizes[-1]]
        out += [Case(shape, 1, a, tokens=1024) for a in ("α 0", "α 0.8")]
        out += [Case(shape, 1, a, cold=True) for a in ("α 0", "α 0.8")]
        out += [Case(shape, 1, a, tokens=64, turns=4) for a in ("α 0", "α 0.8")]
        if shape in BENCH:  # the benchmark's own generations
            out += [
                Case(shape, b, a, tokens=64, queue=False)
                for b in batches
                if b <= measured_sizes[-1]
                for a in ("α 0", "α 0.8")
            ]
            out += [
                Case(shape, b, "α 0.8", tokens=256, queue=False) for b in batches if b <= measured_sizes[-1]
            ]
            out += [  # as measured there: the host bounds E2B's rounds (r47)
                Case(shape, b, a, tokens=256, queue=False, device=HOST_BOUND_DEVICE)
                for b in batches
                if b <= measured_sizes[-1]
                for a in ("α 0", "α 0.8", "ragged")
                if b > 1 or a != "ragged"
            ]
            out += [  # ... and turning between plain steps and drafting costs its host more (r49)
                Case(shape, b, a, tokens=256, queue=False, device=HOST_BOUND_DEVICE, switch=HOST_SWITCH)
                for b in batches
                if b <= measured_sizes[-1]
                for a in ("α 0", "α 0.8", "ragged")
                if b > 1 or a != "ragged"
            ]
    return out


def table(rows: list[dict], rules: bool) -> str:
    """Markdown, a line per case (a batch that starts together: also auto's and the best fixed
    k's speedups while it is full); with `rules`, each rule's gain (* where over 2 standard errors)."""
    names = list(rows[0]["gains"]) if rules and rows else []
    lines = [
        "| case | auto | best fixed k | auto / best | heuristic | while full: auto, best fixed k |"
        + "".join(f" {n} |" for n in names),
        "|---" * (6 + len(names)) + "|",
    ]
    for r in rows:
        line = f"| {r['case']} | {r['auto']:.3f}x | {r['best_fixed']:.3f}x (k={r['best_k']}) "
        line += f"| {r['auto'] / r['best_fixed']:.3f} | {r['heuristic']:.3f}x |"
        if "auto_full" in r:
            line += f" {r['auto_full']:.3f}x, {r['best_fixed_full']:.3f}x (k={r['best_k_full']}) |"
        else:
            line += " – |"
        for n in names:
            gain, error = r["gains"][n]
            line += f" {100 * gain:+.1f}%{'*' if abs(gain) > 2 * error else ''} |"
        lines.append(line)
    return "\n".join(lines)


def rule_summary(rows: list[dict]) -> str:
    """Markdown, a line per rule of a `--rules` run: the cases it gains over 1% (of them, over two
    standard errors), its largest gain, the cases it loses over 1% (likewise) and its largest loss."""
    lines = [
        "| rule | cases over +1% (over 2 s.e.) | largest gain | cases under −1% (over 2 s.e.) | largest loss |",
        "|---|---|---|---|---|",
    ]
    for name in rows[0]["gains"] if rows else []:
        gains = [(r["gains"][name][0], r["gains"][name][1], r["case"]) for r in rows]
        up = [g for g in gains if g[0] > 0.01]
        down = [g for g in gains if g[0] < -0.01]
        best, worst = max(gains), min(gains)
        lines.append(
            f"| {name} | {len(up)} ({sum(g > 2 * e for g, e, _ in up)}) | {100 * best[0]:+.1f}% ({best[2]}) "
            f"| {len(down)} ({sum(-g > 2 * e for g, e, _ in down)}) | {100 * worst[0]:+.1f}% ({worst[2]}) |"
        )
    return "\n".join(lines)


def _run(job) -> dict:
    case, generations, rules, noise = job
    return summary(case, simulate(case, generations, RULES_OFF if rules else {}, noise))


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=40, help="per case (each policy runs the same draws)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help=f"of {BATCHES}")
    p.add_argument("--rules", action="store_true", help="auto without each rule too (RULES_OFF)")
    p.add_argument("--match", default="", help="only cases whose name contains this")
    p.add_argument("--opening", action="store_true", help="opening rounds cost more (OPENING)")
    p.add_argument("--quiet-rounds", action="store_true", help="rounds as steady as r53's (QUIET_ROUNDS)")
    p.add_argument(
        "--switch",
        type=float,
        nargs=2,
        metavar=("IN", "OUT"),
        help="also every shape on a host-bound card where a drafting round after a plain step costs "
        "IN plain steps more, a plain step after a drafting round OUT more (r49: 0.3 0.1)",
    )
    p.add_argument("--jobs", type=int, default=1, help="processes")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    return p


def noise_of(args: argparse.Namespace) -> Noise:
    """The card's noise as the command line asks (`--opening`, `--quiet-rounds`)."""
    noise = dataclasses.replace(Noise(), opening=OPENING) if args.opening else Noise()
    return dataclasses.replace(noise, **QUIET_ROUNDS) if args.quiet_rounds else noise


def main(argv=None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.switch and not all(math.isfinite(c) and c >= 0 for c in args.switch):
        parser.error(f"--switch takes two costs >= 0 in plain steps, got {args.switch}")
    noise = noise_of(args)
    jobs = [
        (c, args.generations, args.rules, noise)
        for c in cases(tuple(args.batches), switch=tuple(args.switch) if args.switch else None)
        if args.match in c.name
    ]
    started, rows = time.perf_counter(), []
    with multiprocessing.Pool(args.jobs) as pool:
        for row in pool.imap(_run, jobs):
            rows.append(row)
            print(table([row], args.rules).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows, args.rules))
    if args.rules:
        print("\n" + rule_summary(rows))
    print(f"\n{len(rows)} cases, {args.generations} generations each, {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
