"""How many tokens to draft each round: fixed, the reference heuristic, or a cost model.

A policy is asked `choose(limit)` before every round, told `observe(k, accepted)` after
each drafting round and `observe_time(k, seconds)` of what each round (k >= 1) or plainly
decoded token (k = 0) really took. Choosing 0 means "decode one token plainly". The loop asks
one round ahead (it queues round r+1 before reading round r back), so a choice never sees the
outcome of the round just before it.

`Auto` maximises expected tokens per second. A round drafting k tokens costs
`k * draft + verify[k]` seconds (as measured, until the loop has timed such rounds) and yields
1 + a_1 + a_1 a_2 + ... + a_1 ... a_k tokens on average, where a_j is the chance that draft j
is accepted once drafts 1..j-1 were; plain decoding yields one token per `plain` seconds. The costs are measured once per device
(`costs.py`), the a_j are tracked online, and k = 0 is chosen when no k beats plain decoding
(probing again after 16 or more, then twice as many, ... up to 256 plain tokens; after a failed
first round, after 16 whatever a probe costs; in between, only a round read back that kept a
draft can end the stretch early, never the clock alone). What rounds really cost in the loop is
learnt from the clock, per k.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Protocol

MAX_DRAFT = 16  # longest draft a round may use; sliding caches keep this much room

HEURISTIC_START = 6  # Google's assistants ship num_assistant_tokens = 6 (generation_config.json)

PRIOR_ACCEPTANCE = 0.5  # a_1 before any round is observed
PRIOR_WEIGHT = 2.0  # pseudo-rounds behind each prior: a_j leans on a_{j-1} until j is tried
DECAY = 0.98  # per observed round: acceptance counts remember about the last 50 rounds
TIMINGS = 9  # a k's cost is the median of its last 9 timings: one hiccup moves nothing ...
MIN_TIMINGS = 3  # ... once it has 3 (the median of 2 is their mean: a hiccup would count half)
OUTLIER = 3.0  # the first timing of a k over 3x its estimate is a compile: passed over
FLOOR_MARGIN = 0.1  # a round believed at its floor must beat plain decoding by 10% (see rates())
PROBE_FIRST = 16  # plain tokens before drafting is tried again (at least) ...
PROBE_LAST = 256  # ... doubling after each failed probe, up to this
PROBE_SHARE = 0.01  # ... and at least as many as keep a failed probe's cost within 1% of them


class DraftLength(Protocol):
    def choose(self, limit: int) -> int:
        """Drafts for the next round, 0..limit (0: decode plainly)."""

    def observe(self, k: int, accepted: int) -> None:
        """A round drafted k >= 1 tokens and the first `accepted` of them were kept."""

    def observe_time(self, k: int, seconds: float) -> None:
        """A round drafting k >= 1 tokens took `seconds` on the host's clock; k = 0: seconds
        per plainly decoded token."""


@dataclass
class Fixed:
    """k drafts every round (fewer only when fewer tokens remain); k = 0 is plain decoding."""

    k: int

    def __post_init__(self):
        if not 0 <= self.k <= MAX_DRAFT:
            raise ValueError(f"a fixed draft length must be in 0..{MAX_DRAFT}, got {self.k}")

    def choose(self, limit: int, rows=()) -> int:
        return min(self.k, limit)

    def observe(self, k: int, accepted) -> None:
        """A fixed k ignores acceptance."""

    def observe_time(self, k: int, batch: int, seconds: float) -> None:
        """... and timing."""

    def forget(self, row: int) -> None:
        """... and rows."""


@dataclass
class Heuristic:
    """transformers' "heuristic" schedule (candidate_generator.py, 5.17): +2 after a round whose
    drafts were all accepted, -1 otherwise, kept within low..high. Restarts every generation
    (transformers' "heuristic_transient")."""

    k: int = HEURISTIC_START
    low: int = 1
    high: int = MAX_DRAFT

    def choose(self, limit: int, rows=()) -> int:
        return min(self.k, limit)

    def observe(self, k: int, accepted) -> None:
        fully = all(m == k for m in accepted.values())
        self.k = min(self.k + 2, self.high) if fully else max(self.k - 1, self.low)

    def observe_time(self, k: int, batch: int, seconds: float) -> None:
        """The schedule follows acceptance only, as transformers' does."""

    def forget(self, row: int) -> None:
        """One schedule for the batch."""


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Seconds per unit of work on one device, for one target and drafter."""

    plain: float  # per token of pipelined plain decoding
    verify: tuple[float, ...]  # verify[k]: one target forward of k + 1 tokens, k = 0..MAX_DRAFT
    draft: float  # per drafter step

    def round(self, k: int) -> float:
        """Seconds of a round drafting k tokens (k = 0: one plain token)."""
        return self.plain if k == 0 else self.verify[k] + k * self.draft


class Auto:
    """The k that maximises expected tokens per second, from measured costs and acceptance
    tracked online per draft position."""

    def __init__(self, costs: Costs):
        if len(costs.verify) != MAX_DRAFT + 1:
            raise ValueError(f"costs.verify has {len(costs.verify)} entries, expected {MAX_DRAFT + 1}")
        self.costs = costs
        self.tries = [0.0] * MAX_DRAFT  # rounds (decayed) that reached draft position j + 1
        self.hits = [0.0] * MAX_DRAFT  # ... and kept it
        # A probe that fails costs one round instead of one plain token: where that is dear
        # (MLX CUDA's quantized verify of 2-7 rows: 2.5x a plain token) probes come rarer.
        extra = min(costs.round(k) for k in range(1, MAX_DRAFT + 1)) / costs.plain - 1
        self.probe_first = min(max(PROBE_FIRST, math.ceil(extra / PROBE_SHARE)), PROBE_LAST)
        self.probe_gap = self.probe_first  # plain tokens between the next probe and the one after
        self.plain_left = 0  # plain tokens before the next probe: the first round drafts
        # One round is thin evidence: with its first draft rejected (one time in five at
        # alpha = 0.8) a_1 falls to 1/3 and, where a round is dear, drafting stops for
        # probe_first tokens (75 on the 31B: simulated over 128 tokens at alpha = 0.8, a tenth
        # of generations never drafted again). So the plain stretch after the first drafting
        # round is PROBE_FIRST long; probe_first and its doublings follow (alpha = 0 pays one
        # more failed round: 1% of 128 tokens on the 31B, 0.2% of 1000).
        self.rounds_seen = 0  # drafting rounds observed
        # A plain stretch (its probes included) ends only when a round read back since it
        # began kept a draft (the loop asks one round ahead: the stretch may begin before the
        # last round is seen), never on the clock alone. In a stretch only plain steps are
        # timed: a slower card (or a few slow plain steps) raises plain decoding's cost while
        # the rounds' stay as last timed; and a failed probe's own timing, a little under its
        # measurement, made every untimed round look cheaper. Either way a useless drafter
        # looked worth rounds again (MLX CUDA at alpha = 0: E2B ~8 useless rounds per 128
        # tokens as plain steps swung 8-15 ms; 26B-A4B 2-6 rounds after each failed probe).
        self.kept_rounds = 0  # drafting rounds observed that kept at least one draft
        self.stretch_kept: int | None = None  # kept_rounds when the plain stretch last chose; None: drafting
        # The loop asks one round ahead. Until the first drafting round is seen, the next
        # choice knows nothing more than the first did: a plain step goes behind it (a guess
        # that drafts again would cost a useless drafter two rounds; reading the first back
        # before choosing would drain the pipeline).
        self.awaiting_first = False  # a drafting round was chosen, and none seen yet
        # The measurement is a few rounds on a scratch cache, once per device; a shared GPU
        # drifts (seen on MLX CUDA: rounds 0.7-2x their measured cost) and a generation's
        # rounds need not cost what the scratch ones did. So each k's cost is learnt from
        # the clock once it has been timed MIN_TIMINGS times; until then it is assumed to cost
        # its measurement times the best observed/measured ratio (median of its timings so
        # far) of any length, plain steps included: the card's drift carries over (a loop
        # whose plain tokens cost 8% over their measurement drafted with a useless drafter,
        # its rounds taken at their bare measurement), optimistically, so an untimed k gets
        # tried (and learnt) when that would make it the best. (A plain token never timed is
        # scaled down so, never up: see cost().)
        # (A median, not a running mean: seen on MLX CUDA, one plain step's hiccup inflated
        # the plain cost until drafting with a useless drafter looked cheaper, and as plain
        # steps were then no longer chosen, nothing corrected it.)
        self.timings: dict[int, deque[float]] = {}  # k -> its last TIMINGS timings
        # k -> their median once there are MIN_TIMINGS, seconds per round (k = 0: per plain token)
        self.observed: dict[int, float] = {}
        self.compiled: set[int] = set()  # k whose first, outlying timing was passed over
        self.ratios: dict[int, float] = {}  # k -> median of its timings so far / its measured cost
        self.best_ratio = 1.0  # the least of them

    def acceptance(self) -> list[float]:
        """a_j for j = 1..MAX_DRAFT: each position's kept / reached, shrunk towards the
        position before it (the first towards PRIOR_ACCEPTANCE)."""
        out, prior = [], PRIOR_ACCEPTANCE
        for tries, hits in zip(self.tries, self.hits):
            prior = (hits + PRIOR_WEIGHT * prior) / (tries + PRIOR_WEIGHT)
            out.append(prior)
        return out

    def rates(self, limit: int) -> list[float]:
        """Expected tokens per second for k = 0..limit, a round believed at its floor (a plain
        step and k drafter steps) weighed as FLOOR_MARGIN dearer."""
        # In truth a verify of k + 1 rows costs more than one row. A round believed at the
        # floor rests on noise (a lucky timing, a plain cost timed while the card ran slower,
        # a measured verify within noise of a plain token), and there a useless drafter looked
        # worth a round down to 3% acceptance (MLX CUDA, 26B-A4B at alpha = 0: 43 k = 1 rounds
        # in a row, each 1.3x a plain token, as plain steps last timed in a slow spell).
        a = self.acceptance()
        plain = self.cost(0)
        out, expected, reach = [], 1.0, 1.0
        for k in range(limit + 1):
            seconds = self.cost(k)
            if k:
                reach *= a[k - 1]
                expected += reach
                if seconds <= plain + k * self.costs.draft:
                    seconds *= 1 + FLOOR_MARGIN
            out.append(expected / seconds)
        return out

    def cost(self, k: int) -> float:
        """Seconds a round drafting k tokens takes (k = 0: one plain token): as timed in this
        generation, else as measured times the best ratio timed rounds have shown (an untimed
        plain token: scaled down only); a round at least a plain token's and k drafter steps'."""
        # Plain steps too: a round scaled by a ratio their first timings set, against their
        # bare measurement, looked cheaper than it was (seen on MLX CUDA, E2B: measured plain
        # 11.1 ms, timed 7.8 ms; a useless drafter then drafted 4 rounds in a row).
        if k in self.observed:
            seconds = self.observed[k]
        elif k == 0 and 0 not in self.ratios:
            # Plain decoding not timed yet (a generation opens with rounds, and a plain step
            # behind a drafting round is not timed): rounds timed slower than measured say
            # that rounds cost more than measured, not that a plain token does. Scaled up
            # alike, rounds kept their measured price against plain decoding (seen on MLX
            # CUDA, 26B-A4B at alpha = 0: opening rounds took 2-2.5 plain tokens, measured
            # 1.2-1.3, and 5-9 useless rounds ran before a plain token was timed).
            seconds = self.costs.plain * min(self.best_ratio, 1.0)
        else:
            seconds = self.costs.round(k) * self.best_ratio
        if k == 0:
            return seconds
        # A round is at least a plain step and k drafter steps (timings are noisy; believing
        # a round cheaper would have auto draft with a useless drafter).
        return max(seconds, self.cost(0) + k * self.costs.draft)

    def forget(self, row: int) -> None:
        """(B = 1 only until the batch-aware policy lands.)"""

    def choose(self, limit: int, rows=()) -> int:
        limit = min(limit, MAX_DRAFT)
        if limit <= 0 or self.awaiting_first:
            return 0
        rates = self.rates(limit)
        best = max(range(limit + 1), key=rates.__getitem__)
        if self.stretch_kept == self.kept_rounds:  # in a plain stretch, no draft kept since it began
            best = 0
        if best == 0 and self.plain_left > 0:
            self.stretch_kept = self.kept_rounds
            self.plain_left -= 1
            return 0
        # Plain tokens before the next probe, should drafting stop paying, and after it.
        if self.rounds_seen == 0:  # the first drafting round: a short stretch if it fails
            self.plain_left, self.probe_gap = PROBE_FIRST, self.probe_first
        elif best > 0:  # drafting pays: probe_first, then twice as many
            self.plain_left, self.probe_gap = self.probe_first, min(2 * self.probe_first, PROBE_LAST)
        else:  # a probe after a failed one: twice as many as before it
            self.plain_left, self.probe_gap = self.probe_gap, min(2 * self.probe_gap, PROBE_LAST)
        if best == 0:  # a probe: the best k >= 1; the stretch goes on unless it keeps a draft
            best = max(range(1, limit + 1), key=rates.__getitem__)
            self.stretch_kept = self.kept_rounds
        else:
            self.stretch_kept = None
        self.awaiting_first = not any(self.tries)  # no round observed yet
        return best

    def observe(self, k: int, accepted) -> None:
        for m in accepted.values():
            self._observe(k, m)

    def _observe(self, k: int, accepted: int) -> None:
        self.awaiting_first = False
        self.rounds_seen += 1
        self.kept_rounds += accepted > 0
        for j in range(MAX_DRAFT):
            self.tries[j] *= DECAY
            self.hits[j] *= DECAY
        for j in range(min(accepted + 1, k)):
            self.tries[j] += 1
        for j in range(accepted):
            self.hits[j] += 1

    def observe_time(self, k: int, batch: int, seconds: float) -> None:
        if k not in self.timings and k not in self.compiled and seconds > OUTLIER * self.cost(k):
            self.compiled.add(k)  # the first round of this length compiling kernels for its shapes
            return
        window = self.timings.setdefault(k, deque(maxlen=TIMINGS))
        window.append(seconds)
        median = statistics.median(window)
        if len(window) >= MIN_TIMINGS:
            self.observed[k] = median
        # Kept here, not in cost(): choose() runs before every token, plain ones too.
        self.ratios[k] = median / self.costs.round(k)
        self.best_ratio = min(self.ratios.values())
