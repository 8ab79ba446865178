"""How many tokens to draft in each round of a batch: a fixed k, transformers' heuristic, or `Auto`.

The loop asks `choose(limit, rows)` before every round: one k for every row (a verify forward
has one shape, and a row's drafts past what it would have wanted cost it nothing), 0 for one
plain step of the batch. It tells `observe(k, accepted)` each row's kept drafts after a drafting
round, `observe_time(k, batch, seconds, own)` what a round took where its clock can tell (only a
round run in a full pipeline, `engine.py`), and `forget(row)` when a row leaves. After a
choice of 0 it asks `shadow()`: whether the plain step should carry a shadow, one draft per row
judged beside it and never emitted (a drafter step's cost), whose verdicts come to `observe` as
a round of k = 1. It asks one round ahead (round r+1 is queued before round r is read back),
so a choice never sees the outcome of the round just before it. A batch of one is B = 1.

`Auto` maximises expected tokens per second. A round of B rows drafting k each costs
`verify(B, k) + k * draft(B)` seconds (`Costs`, measured once per device, then as the loop's
clock says) and yields, summed over its rows, 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k tokens, where
a_j is the chance that a row's draft j is kept once its drafts 1..j-1 were. It is three parts:
`Acceptance` (the a_j of each row), `CostModel` (the seconds of each (B, k)) and `Probes` (when
to draft again once plain decoding pays; a probe is a shadow, as is a drafting round the
rates ask for before any draft was kept). Every tunable rule is a field of `Rules`; docs/auto.md
shows what each buys in the loop-faithful simulation (`python -m bench.simulate`).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MAX_DRAFT = 16  # longest draft a round may use; sliding caches keep this much room

HEURISTIC_START = 6  # Google's assistants ship num_assistant_tokens = 6 (generation_config.json)


class DraftLength(Protocol):
    def choose(self, limit: int, rows: Sequence[int]) -> int:
        """Drafts per row for the next round of the batch made of `rows` (row ids), 0..limit;
        0 = one plain step for every row."""

    def observe(self, k: int, accepted: Mapping[int, int]) -> None:
        """A round drafted k >= 1 tokens for every row; row id -> how many of that row's drafts
        were kept (0..k)."""

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        """A round of `batch` rows drafting k tokens each (k = 0: one plain step of the batch)
        took `seconds` between its read-back and the last one's (the device's time when the host
        keeps ahead; when the host bounds the loop, its work on the round queued after this
        one); `own`: the round's own share of the clock, the host's work on it and its wait
        (None where the loop cannot tell)."""

    def forget(self, row: int) -> None:
        """A row left the batch (its own estimate goes; auto keeps its rounds among the others')."""

    def shadow(self) -> bool:
        """Asked after `choose` returned 0: whether the drafter should draft one token per row
        beside that plain step, judged by its logits and never emitted (a shadow: a drafter
        step's cost, where a drafting round costs a verify of two tokens). Its verdicts come to
        `observe` as a round of k = 1."""


@dataclass
class Fixed:
    """k drafts every round (fewer only when fewer tokens remain); k = 0 is plain decoding."""

    k: int

    def __post_init__(self):
        if not 0 <= self.k <= MAX_DRAFT:
            raise ValueError(f"a fixed draft length must be in 0..{MAX_DRAFT}, got {self.k}")

    def choose(self, limit: int, rows: Sequence[int]) -> int:
        return min(self.k, limit)

    def observe(self, k: int, accepted: Mapping[int, int]) -> None:
        """A fixed k ignores acceptance ..."""

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        """... and timing."""

    def forget(self, row: int) -> None:
        """... and rows."""

    def shadow(self) -> bool:
        return False


@dataclass
class Heuristic:
    """transformers' "heuristic" schedule (candidate_generator.py, 5.17) for each row: +2 after
    a round whose drafts the row kept all of (all it asked for), -1 otherwise, within
    low..high, from `start` for a new row (transformers' "heuristic_transient"). A round drafts
    what its keenest row asks for: the others' extra drafts cost them nothing."""

    start: int = HEURISTIC_START
    low: int = 1
    high: int = MAX_DRAFT
    asks: dict[int, int] = field(default_factory=dict)  # row -> its k

    def choose(self, limit: int, rows: Sequence[int]) -> int:
        return min(max((self.asks.get(row, self.start) for row in rows), default=0), limit)

    def observe(self, k: int, accepted: Mapping[int, int]) -> None:
        for row, kept in accepted.items():
            asked = self.asks.get(row, self.start)
            self.asks[row] = min(asked + 2, self.high) if kept >= min(asked, k) else max(asked - 1, self.low)

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        """The schedule follows acceptance only, as transformers' does."""

    def forget(self, row: int) -> None:
        self.asks.pop(row, None)

    def shadow(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Seconds of the work of a round on one device, for one target and drafter, measured at a
    few batch sizes. Between two measured sizes a cost is interpolated linearly in the rows;
    below the smallest it is the smallest's (fewer rows cost no more); beyond the largest it
    grows in proportion to the rows (the largest's cost per row: a compute-bound step)."""

    verify: tuple[
        tuple[float, ...], ...
    ]  # [i][k]: a target forward of batches[i] rows x (k + 1) tokens; [i][0]: a plain step
    draft: tuple[float, ...]  # [i]: a drafter step of batches[i] rows
    batches: tuple[int, ...] = (1,)  # the measured batch sizes, ascending

    def __post_init__(self):
        if (
            not self.batches
            or any(b < 1 for b in self.batches)
            or list(self.batches) != sorted(set(self.batches))
        ):
            raise ValueError(f"costs.batches must be distinct sizes >= 1, ascending; got {self.batches}")
        if len(self.verify) != len(self.batches) or len(self.draft) != len(self.batches):
            raise ValueError(
                f"costs has {len(self.batches)} batch sizes but {len(self.verify)} verify rows and "
                f"{len(self.draft)} draft entries"
            )
        for b, row in zip(self.batches, self.verify):
            if len(row) != MAX_DRAFT + 1:
                raise ValueError(
                    f"costs.verify at batch {b} has {len(row)} entries, expected {MAX_DRAFT + 1}"
                )
        values = [s for row in self.verify for s in row] + list(self.draft)
        if not all(math.isfinite(s) and s > 0 for s in values):
            raise ValueError("costs must be finite and positive seconds")

    def step(self, k: int, batch: int = 1) -> float:
        """Seconds of a target forward of `batch` rows x (k + 1) tokens (k = 0: a plain step)."""
        return self._at([row[k] for row in self.verify], batch)

    def drafter(self, batch: int = 1) -> float:
        """Seconds of a drafter step of `batch` rows."""
        return self._at(self.draft, batch)

    def plain(self, batch: int = 1) -> float:
        return self.step(0, batch)

    def round(self, k: int, batch: int = 1) -> float:
        """Seconds of a round of `batch` rows drafting k each (k = 0: one plain step)."""
        return self.step(k, batch) + k * self.drafter(batch)

    def _at(self, values: Sequence[float], batch: int) -> float:
        sizes = self.batches
        if batch <= sizes[0]:
            return values[0]
        if batch >= sizes[-1]:
            return values[-1] * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        if sizes[i] == batch:
            return values[i]
        w = (batch - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return values[i - 1] + w * (values[i] - values[i - 1])

    def to_json(self) -> dict:
        return {
            "batches": list(self.batches),
            "verify": [list(r) for r in self.verify],
            "draft": list(self.draft),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Costs:
        """The inverse of `to_json`; a ValueError naming what is missing or malformed."""
        try:
            batches = tuple(int(b) for b in data["batches"])
            verify = tuple(tuple(float(s) for s in row) for row in data["verify"])
            draft = tuple(float(s) for s in data["draft"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"costs JSON needs batches, verify (one row per batch) and draft: {e!r}") from e
        return cls(batches=batches, verify=verify, draft=draft)


@dataclass(frozen=True, kw_only=True)
class Rules:
    """Auto's tunable rules at the values docs/auto.md justifies by simulation (which switches
    each off in turn). Rounds count rounds of the batch, a plain step of the batch included."""

    prior: float = 0.5  # a_1 before any round is observed ...
    prior_weight: float = 2.0  # ... worth 2 rounds; an untried a_j leans on a_{j-1} as much
    decay: float = 0.98  # per observed round: counts remember about the last 50 rounds
    per_row: bool = True  # each row its own a_j, shrunk towards the other rows' (False: one for all)
    remember_left: bool = True  # a row that left still counts among the others' (fading by `decay`)
    timings: int = 9  # a (batch, k)'s cost: the median of its last 9 timings (a hiccup moves nothing)
    scale_untimed: bool = True  # an untimed one: its measurement x the least timed/measured ratio ...
    plain_down: bool = True  # ... a plain step's only if that is < 1: dear rounds say nothing of it
    floor: bool = True  # no round is believed cheaper than a plain step and its k drafter steps
    own_share: bool = True  # a round costs its own share of the clock, not the interval before its read-back
    outlier: float = 3.0  # a (batch, k)'s first timing over 3x its estimate is a compile: passed over
    blind_plain: bool = True  # the choice behind the first drafting round, before it is seen, is plain
    cheap_probe: bool = True  # a probe drafts the cheapest round's k (False: the best rate's k >= 1)
    probe_first: int = 16  # plain rounds before drafting is tried again once it stopped paying ...
    probe_share: float = 0.005  # ... then enough between probes that a failed one costs 0.5% of them
    kept_ends_stretch: bool = True  # a plain stretch ends before its probe only on a kept draft ...
    thin: float = 8.0  # ... and, while fewer than 8 rows x rounds reached draft 1, one brings the probe near
    thin_wait: int = 2  # drafting stopped on thin evidence (a failed first round): probe after 2, not 16
    room_no_verdict: bool = True  # plain for want of room (a row near its end) is no verdict on drafting
    shadow_probe: bool = True  # a probe is a shadow (a drafter step beside a plain step), priced so
    shadow_opening: bool = True  # no draft kept yet after a round: a shadow where the rates say draft


class _Counts:
    """Per draft position j: rounds (decayed) that reached it, and that kept it."""

    def __init__(self):
        self.tries = [0.0] * MAX_DRAFT
        self.hits = [0.0] * MAX_DRAFT

    def decay(self, factor: float) -> None:
        self.tries = [t * factor for t in self.tries]
        self.hits = [h * factor for h in self.hits]

    def count(self, k: int, kept: int) -> None:
        """A round of k drafts that kept the first `kept`."""
        for j in range(min(kept + 1, k)):
            self.tries[j] += 1
        for j in range(kept):
            self.hits[j] += 1


class Acceptance:
    """The chance that a row's draft j is kept once its drafts 1..j-1 were: counted per row and
    per position, forgetting slowly. A row's count at j is shrunk towards the other rows' at j,
    and theirs towards the row's own j - 1 (so a new row starts from the batch's, and a lone
    row's unreached positions lean on the one before, the first on `rules.prior`). A row that
    leaves stays among the others' counts (`rules.remember_left`), fading as every count does:
    the next conversation starts from the last ones'."""

    def __init__(self, rules: Rules):
        self.rules = rules
        self._rows: dict[int, _Counts] = {}
        self._all = _Counts()  # every row's counts, summed
        self.rounds = 0  # drafting rounds observed
        self.kept_rounds = 0  # ... in which some row kept a draft

    def observe(self, k: int, accepted: Mapping[int, int]) -> None:
        self._all.decay(self.rules.decay)
        for row, kept in accepted.items():
            if not 0 <= kept <= k:
                raise ValueError(f"row {row} kept {kept} of {k} drafts")
            own = self._rows.setdefault(row, _Counts())
            own.decay(self.rules.decay)
            own.count(k, kept)
            self._all.count(k, kept)
        self.rounds += 1
        self.kept_rounds += any(accepted.values())

    @property
    def evidence(self) -> float:
        """Rows x rounds (decayed) that reached draft 1: what the estimate rests on."""
        return self._all.tries[0]

    def forget(self, row: int) -> None:
        own = self._rows.pop(row, None)
        if own is not None and not self.rules.remember_left:
            self._all.tries = [max(a - b, 0.0) for a, b in zip(self._all.tries, own.tries)]
            self._all.hits = [max(a - b, 0.0) for a, b in zip(self._all.hits, own.hits)]

    def of_row(self, row: int) -> list[float]:
        """a_1..a_MAX_DRAFT for `row` (a row never seen: the batch's)."""
        own = self._rows.get(row) if self.rules.per_row else None
        w, prev, out = self.rules.prior_weight, self.rules.prior, []
        for j in range(MAX_DRAFT):
            own_tries, own_hits = (own.tries[j], own.hits[j]) if own else (0.0, 0.0)
            others_tries = max(self._all.tries[j] - own_tries, 0.0)
            others_hits = min(max(self._all.hits[j] - own_hits, 0.0), others_tries)
            prior = (others_hits + w * prev) / (others_tries + w)
            prev = (own_hits + w * prior) / (own_tries + w)
            out.append(prev)
        return out

    def expected(self, limit: int, rows: Sequence[int]) -> list[float]:
        """Expected tokens of a round drafting k = 0..limit, summed over `rows`."""
        total = [0.0] * (limit + 1)
        for row in rows:
            tokens, reach = 1.0, 1.0
            total[0] += 1.0
            for k, a in enumerate(self.of_row(row)[:limit], start=1):
                reach *= a
                tokens += reach
                total[k] += tokens
        return total


class CostModel:
    """Seconds of a round of `batch` rows drafting k (k = 0: a plain step): the median of its
    last timings once the loop's clock has timed that (batch, k); else its measurement (`Costs`)
    times the least timed/measured ratio seen so far (the card's drift carries over, and the
    least, so that an untimed k gets tried when it would be the best)."""

    def __init__(self, costs: Costs, rules: Rules):
        self.costs, self.rules = costs, rules
        self._timings: dict[tuple[int, int], deque[float]] = {}  # (batch, k) -> its last timings
        self._median: dict[tuple[int, int], float] = {}  # ... their median
        self._ratio: dict[tuple[int, int], float] = {}  # ... over its measured cost
        self._best_ratio = 1.0  # the least of those ratios
        self._compiled: set[tuple[int, int]] = set()  # first timings passed over as compiles

    def observe(self, k: int, batch: int, seconds: float) -> None:
        key = (batch, k)
        first = key not in self._timings and key not in self._compiled
        if first and seconds > self.rules.outlier * self.seconds(k, batch):
            self._compiled.add(key)  # the first round of this shape compiling its kernels
            return
        window = self._timings.setdefault(key, deque(maxlen=self.rules.timings))
        window.append(seconds)
        self._median[key] = statistics.median(window)
        if self.rules.scale_untimed:
            self._ratio[key] = self._median[key] / self.costs.round(k, batch)
            self._best_ratio = min(self._ratio.values())

    def seconds(self, k: int, batch: int) -> float:
        """The estimate; a drafting round's at least `floor(k, batch)`."""
        timed = self._median.get((batch, k))
        if timed is None:
            ratio = min(self._best_ratio, 1.0) if k == 0 and self.rules.plain_down else self._best_ratio
            timed = self.costs.round(k, batch) * ratio
        return max(timed, self.floor(k, batch)) if k and self.rules.floor else timed

    def floor(self, k: int, batch: int) -> float:
        """The least a round of k drafts can cost: a plain step and k drafter steps."""
        return self.seconds(0, batch) + k * self.costs.drafter(batch)


class Probes:
    """When to draft again once plain decoding pays: one drafting round (a probe) after
    `rules.probe_first` plain rounds (`rules.thin_wait` while the acceptance estimate rests on
    little), then one every `stretch` while they fail. A stretch ends
    before its probe only when a round read back since it began kept a draft (in a stretch only
    plain steps are timed, and the clock alone would end it on their noise); while the evidence
    is thin such a draft brings the next probe within `rules.probe_first`."""

    def __init__(self, rules: Rules):
        self.rules = rules
        self.left = 0  # plain rounds before the next probe (the first choice may be one)
        self._fresh = True  # no choice made yet
        self._kept_at: int | None = None  # kept rounds when the stretch last chose; None: drafting

    def waiting(self, kept_rounds: int) -> bool:
        """In a plain stretch that `choose` would go on with whatever the rates say: no draft
        kept since it began, and plain rounds left before its probe (the caller may then skip
        the rates and call `choose` with best = 0)."""
        return self.rules.kept_ends_stretch and self._kept_at == kept_rounds and self.left > 0

    def choose(self, best: int, probe: int, kept_rounds: int, stretch: int, thin: bool = False) -> int:
        """The next round's k. best: the k of the best rate (0: plain pays); probe: the k to
        probe with; kept_rounds: rounds seen that kept a draft; stretch: plain rounds between
        failed probes; thin: the acceptance estimate rests on little."""
        kept = self._kept_at is not None and self._kept_at != kept_rounds
        if self.rules.kept_ends_stretch and self._kept_at == kept_rounds:
            best = 0  # no draft kept since the stretch began
        if best == 0 and kept and thin:
            self.left = min(self.left, self.rules.probe_first)  # one kept draft is worth another look
        if best == 0 and self.left > 0:
            self._kept_at = kept_rounds
            self.left -= 1
            return 0
        # After drafting (or a first probe) a dip is likelier than a useless drafter: a short stretch.
        first = self.rules.thin_wait if thin else self.rules.probe_first  # one failed round says little
        self.left = first if best or self._fresh else stretch
        self._fresh = False
        self._kept_at = None if best else kept_rounds
        return best or probe


class Auto:
    """The k with the most expected tokens per second for the batch, from `Acceptance`,
    `CostModel` and `Probes` (see the module docstring)."""

    def __init__(self, costs: Costs, rules: Rules | None = None):
        self.rules = rules or Rules()
        self.acceptance = Acceptance(self.rules)
        self.cost = CostModel(costs, self.rules)
        self.probes = Probes(self.rules)
        self._blind = False  # a drafting round is in flight and none has been seen
        self._shadow = False  # the last choice, a plain step, is to carry a shadow

    def rates(self, limit: int, rows: Sequence[int]) -> list[float]:
        """Expected tokens per second of a round drafting k = 0..limit for `rows`."""
        seconds = [self.cost.seconds(k, len(rows)) for k in range(limit + 1)]
        return [n / s for n, s in zip(self.acceptance.expected(limit, rows), seconds)]

    def choose(self, limit: int, rows: Sequence[int]) -> int:
        self._shadow = False
        limit = min(limit, MAX_DRAFT)
        if limit <= 0 or not rows or self._blind:  # blind: a second guess would only repeat the first
            return 0
        horizon = MAX_DRAFT if self.rules.room_no_verdict else limit
        if limit >= horizon and self.probes.waiting(self.acceptance.kept_rounds):
            # A plain stretch goes on whatever the rates say: not computed (a useless drafter's
            # every round is one of these, and at B = 8 the rates cost ~0.1 ms of host time).
            return self.probes.choose(0, 0, self.acceptance.kept_rounds, 0)
        seconds = [self.cost.seconds(k, len(rows)) for k in range(horizon + 1)]
        rates = [n / s for n, s in zip(self.acceptance.expected(horizon, rows), seconds)]
        best = max(range(limit + 1), key=rates.__getitem__)
        if best == 0 and limit < horizon and max(rates) > rates[0]:
            return 0  # drafting would pay but the rows' room is short: no verdict for `Probes`
        a = self.acceptance
        if best and self.rules.shadow_opening and a.rounds and not a.kept_rounds:
            self._shadow = True  # the rates lean on the prior alone: ask the drafter cheaply
            return 0
        seconds = seconds[: limit + 1]
        # A probe is there to learn whether drafts are kept: the cheapest round, should it fail.
        probe = 1 + min(
            range(limit), key=lambda i: seconds[i + 1] if self.rules.cheap_probe else -rates[i + 1]
        )
        # What a failed probe costs, in plain rounds: a shadow's drafter step, or a round's excess.
        if self.rules.shadow_probe:
            extra = self.cost.costs.drafter(len(rows)) / seconds[0]
        else:
            extra = min(seconds[1:]) / seconds[0] - 1
        stretch = max(self.rules.probe_first, math.ceil(extra / self.rules.probe_share))
        k = self.probes.choose(best, probe, a.kept_rounds, stretch, a.evidence < self.rules.thin)
        if k and not best and self.rules.shadow_probe:
            self._shadow = True
            return 0
        self._blind = self.rules.blind_plain and k > 0 and a.rounds == 0
        return k

    def shadow(self) -> bool:
        return self._shadow

    def observe(self, k: int, accepted: Mapping[int, int]) -> None:
        self._blind = False
        self.acceptance.observe(k, accepted)

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        self.cost.observe(k, batch, own if self.rules.own_share and own is not None else seconds)

    def forget(self, row: int) -> None:
        self.acceptance.forget(row)
