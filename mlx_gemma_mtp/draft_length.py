"""How many tokens to draft each round: fixed, the reference heuristic, or a cost model.

A policy is asked `choose(limit)` before every round, told `observe(k, accepted)` after
each drafting round and `observe_time(k, seconds)` of what each round (k >= 1) or plainly
decoded token (k = 0) really took. Choosing 0 means "decode plainly": the loop then runs `plain_run()`
tokens of pipelined plain decoding before it asks again.

`Auto` maximises expected tokens per second. A round drafting k tokens costs
`k * draft + verify[k]` seconds (as measured, until the loop has timed such rounds) and yields
1 + a_1 + a_1 a_2 + ... + a_1 ... a_k tokens on average, where a_j is the chance that draft j is accepted once drafts 1..j-1 were; plain
decoding yields one token per `plain` seconds. The costs are measured once per device
(`costs.py`), the a_j are tracked online, and k = 0 is chosen when no k beats plain decoding
(probing again after 16, 32, ... 256 plain tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_DRAFT = 16  # longest draft a round may use; sliding caches keep this much room
UNLIMITED = 1 << 62  # plain_run of a policy that never drafts

HEURISTIC_START = 6  # Google's assistants ship num_assistant_tokens = 6 (generation_config.json)

PRIOR_ACCEPTANCE = 0.5  # a_1 before any round is observed
PRIOR_WEIGHT = 2.0  # pseudo-rounds behind each prior: a_j leans on a_{j-1} until j is tried
DECAY = 0.98  # per observed round: acceptance counts remember about the last 50 rounds
SLOWDOWN_RATE = 0.2  # weight of each new timing in the observed/measured cost ratio
OBSERVED_RATE = 0.3  # weight of each new timing in the observed cost of its own k
OUTLIER = 3.0  # a timing over 3x the estimate is a compile or a hiccup: counted as 3x
PROBE_FIRST = 16  # plain tokens before drafting is tried again ...
PROBE_LAST = 256  # ... doubling after each failed probe, up to this


class DraftLength(Protocol):
    def choose(self, limit: int) -> int:
        """Drafts for the next round, 0..limit (0: decode plainly)."""

    def plain_run(self) -> int:
        """After `choose` returned 0: how many tokens to decode plainly before choosing again."""

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

    def choose(self, limit: int) -> int:
        return min(self.k, limit)

    def plain_run(self) -> int:
        return UNLIMITED if self.k == 0 else 1

    def observe(self, k: int, accepted: int) -> None:
        """A fixed k ignores acceptance."""

    def observe_time(self, k: int, seconds: float) -> None:
        """... and timing."""


@dataclass
class Heuristic:
    """transformers' "heuristic" schedule (candidate_generator.py, 5.17): +2 after a round whose
    drafts were all accepted, -1 otherwise, kept within low..high. Restarts every generation
    (transformers' "heuristic_transient")."""

    k: int = HEURISTIC_START
    low: int = 1
    high: int = MAX_DRAFT

    def choose(self, limit: int) -> int:
        return min(self.k, limit)

    def plain_run(self) -> int:
        return 1

    def observe(self, k: int, accepted: int) -> None:
        self.k = min(self.k + 2, self.high) if accepted == k else max(self.k - 1, self.low)

    def observe_time(self, k: int, seconds: float) -> None:
        """The schedule follows acceptance only, as transformers' does."""


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
        self.probe_gap = PROBE_FIRST
        self.probe_due = True  # the first round drafts, whatever the prior says
        # Observed / measured cost, for drafting rounds and for plain tokens. The measurement
        # times each forward alone; in the loop a round's host work overlaps the previous
        # round or not, and a shared GPU drifts (seen on MLX CUDA: rounds 0.7-2x their
        # measured cost). The model learns that from the clock: one ratio for every k, and
        # each k's own cost once it has been timed (the measured curve is noisy per k).
        self.slowdown = {"draft": 1.0, "plain": 1.0}
        self.observed: dict[int, float] = {}  # k -> seconds per round (k = 0: per plain token)

    def acceptance(self) -> list[float]:
        """a_j for j = 1..MAX_DRAFT: each position's kept / reached, shrunk towards the
        position before it (the first towards PRIOR_ACCEPTANCE)."""
        out, prior = [], PRIOR_ACCEPTANCE
        for tries, hits in zip(self.tries, self.hits):
            prior = (hits + PRIOR_WEIGHT * prior) / (tries + PRIOR_WEIGHT)
            out.append(prior)
        return out

    def rates(self, limit: int) -> list[float]:
        """Expected tokens per second for k = 0..limit."""
        a = self.acceptance()
        out, expected, reach = [], 1.0, 1.0
        for k in range(limit + 1):
            if k:
                reach *= a[k - 1]
                expected += reach
            out.append(expected / self.cost(k))
        return out

    def cost(self, k: int) -> float:
        """Seconds a round drafting k tokens takes (k = 0: one plain token): as timed in this
        generation, else as measured times the ratio seen so far."""
        if k in self.observed:
            return self.observed[k]
        return self.costs.round(k) * self.slowdown["draft" if k else "plain"]

    def choose(self, limit: int) -> int:
        limit = min(limit, MAX_DRAFT)
        if limit <= 0:
            return 0
        rates = self.rates(limit)
        best = max(range(limit + 1), key=rates.__getitem__)
        if best == 0 and self.probe_due:
            self.probe_due = False
            return max(range(1, limit + 1), key=rates.__getitem__)  # probe: the best k >= 1
        if best > 0:
            self.probe_gap = PROBE_FIRST
        return best

    def plain_run(self) -> int:
        gap = self.probe_gap
        self.probe_gap = min(2 * gap, PROBE_LAST)
        self.probe_due = True
        return gap

    def observe(self, k: int, accepted: int) -> None:
        for j in range(MAX_DRAFT):
            self.tries[j] *= DECAY
            self.hits[j] *= DECAY
        for j in range(min(accepted + 1, k)):
            self.tries[j] += 1
        for j in range(accepted):
            self.hits[j] += 1

    def observe_time(self, k: int, seconds: float) -> None:
        seconds = min(seconds, OUTLIER * self.cost(k))
        kind = "draft" if k else "plain"
        self.slowdown[kind] += SLOWDOWN_RATE * (seconds / self.costs.round(k) - self.slowdown[kind])
        before = self.observed.get(k, seconds)
        self.observed[k] = before + OBSERVED_RATE * (seconds - before)
