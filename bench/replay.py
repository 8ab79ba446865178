"""Controlled acceptance: each row replays its own known greedy continuation as its drafts.

Draft i of a round whose last token stands at continuation index j is the continuation's token
j + 1 + i where a precomputed hit table says so (one draw per row and continuation position,
against that row's chance for draft i once drafts 1..i-1 were accepted: `draw_hits`), else a
wrong token; the table sits on the device and is gathered at each row's device position, so the
host reads nothing and rounds stay pipelined as with a real drafter. The real drafter still
runs every round (its tokens times 0 stay in the graph), so drafting costs what it costs.

Acceptance specs, per row:
- "alpha=A": every draft at chance A (Leviathan's uniform alpha).
- "profile=NAME": a per-position profile (`PROFILES`), extended with its last value.
- "ragged=H/L": even rows at H, odd rows at L (half and half for an even batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.speculative import MAX_DRAFT, Draft, Proposer, Rows

from .measure import Run

# Published acceptance by draft position, as positions accepted / drafted: 26B-A4B with its
# assistant on vLLM, 4 drafts per round (issue 20's source).
PROFILES = {"26b-vllm": (0.844, 0.599, 0.385, 0.271)}
RAGGED = (0.9, 0.2)


def conditional(cumulative: tuple[float, ...]) -> list[float]:
    """Per-position acceptance from positions accepted / drafted: draft i's chance once drafts
    before it were accepted, extended with the last to MAX_DRAFT."""
    out = [cumulative[0]] + [b / a for a, b in itertools.pairwise(cumulative)]
    return out + [out[-1]] * (MAX_DRAFT - len(out))


@dataclass(frozen=True)
class Acceptance:
    """A spec's name and each row's per-position chances (rows cycle through `rows`)."""

    name: str
    rows: tuple[tuple[float, ...], ...]

    def chances(self, batch: int) -> list[list[float]]:
        """[batch][MAX_DRAFT] each row's chance for draft i once drafts before it were accepted."""
        return [list(self.rows[b % len(self.rows)]) for b in range(batch)]


def parse_acceptance(spec: str) -> Acceptance:
    """ "alpha=0.8", "profile=26b-vllm" or "ragged=0.9/0.2" (ValueError naming a bad one)."""
    kind, _, value = spec.partition("=")
    try:
        if kind == "alpha":
            alphas = [float(value)]
        elif kind == "ragged":
            alphas = [float(v) for v in value.split("/")]
        elif kind == "profile":
            return Acceptance(spec, (tuple(conditional(PROFILES[value])),))
        else:
            raise ValueError
    except (ValueError, KeyError):
        raise ValueError(
            f"acceptance {spec!r}: expected alpha=A, ragged=H/L (A, H, L in 0..1) or profile=NAME "
            f"(NAME of {sorted(PROFILES)})"
        ) from None
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"acceptance {spec!r}: chances must lie in 0..1")
    return Acceptance(spec, tuple((a,) * MAX_DRAFT for a in alphas))


def draw_hits(chances: list[list[float]], width: int, seed: int) -> np.ndarray:
    """[B, width, MAX_DRAFT] bool: whether draft i of a round standing at continuation index j
    is right. One uniform draw per row and continuation position: draft i is right where the
    draw of the position it drafts (j + 1 + i) is under the row's chance for draft i. The draws
    of distinct positions are independent, so a round keeps draft i with that chance once it
    kept drafts 1..i-1 (Leviathan's model), and every draft length meets the same easy and hard
    tokens (as `bench.simulate` draws them): a cell's draft lengths differ by what they do, not
    by their luck."""
    draws = np.random.RandomState(seed).random_sample((len(chances), width + MAX_DRAFT + 1))
    return position_hits(draws) < np.array(chances)[:, None, :]


def position_hits(hits: np.ndarray) -> np.ndarray:
    """[B, width, MAX_DRAFT] from one value per continuation position ([B, width + MAX_DRAFT + 1]):
    draft i of a round at index j gets position j + 1 + i's, whichever round drafts it (a hit
    per position, as `bench.compare_loops` feeds its two loops alike, or `draw_hits`' draws)."""
    width = hits.shape[1] - MAX_DRAFT - 1
    return hits[:, _draft_index(width)]


def _draft_index(width: int) -> np.ndarray:
    """[width, MAX_DRAFT]: the continuation index of draft i of a round standing at index j."""
    return np.arange(width)[:, None] + 1 + np.arange(MAX_DRAFT)[None]


def replay_table(continuations: list[list[int]], hits: np.ndarray, vocab: int) -> mx.array:
    """[B, W, MAX_DRAFT] int32: for a round whose token is continuation j of row b, its draft i
    (the continuation's token j + 1 + i where `hits` says so, else that token + 1). `hits`
    ([B, W, MAX_DRAFT], W >= every continuation's length) covers every index a round may
    stand at."""
    width = hits.shape[1]
    known = np.zeros((len(continuations), width + MAX_DRAFT + 1), dtype=np.int64)
    for b, c in enumerate(continuations):
        known[b, : len(c)] = c
    truth = known[:, _draft_index(width)]  # [B, W, MAX_DRAFT]
    return mx.array(np.where(hits, truth, (truth + 1) % vocab), dtype=mx.int32)


def replay_proposer(
    real: Proposer, table: mx.array, prompt_lens: list[int], key: Callable[[Rows], list[int]] | None = None
) -> Proposer:
    """Drafts from `table` (`replay_table`): row b of the batch replays table row key(rows)[b]
    (default: the row's id, a request's index); `real` (the drafter's own proposer) runs too
    and its tokens are discarded on the device."""
    base = mx.array(prompt_lens, dtype=mx.int32)
    width = table.shape[1]

    def propose(rows: Rows, k: int) -> Draft:
        drafted = real(rows, k).tokens
        ids = mx.array(rows.ids if key is None else key(rows), dtype=mx.int32)
        # A row's token at position p is continuation[p - prompt_len].
        j = mx.clip(rows.cache.positions.offset - mx.take(base, ids), 0, width - 1)  # [B]
        mine = mx.take(table, ids, axis=0)  # [B, W, MAX_DRAFT]
        replayed = mx.take_along_axis(mine, j[:, None, None], axis=1)[:, 0, :k]  # [B, k]
        # `drafted * 0` keeps the drafter's work in the graph; q=None: deterministic drafts.
        return Draft(tokens=replayed + drafted * 0)

    return propose


def by_seed(rows: Rows) -> list[int]:
    """A row's table row is its request's seed: what a server's clients can send (`bench.serve`)."""
    seeds = [s.seed for s in rows.settings]
    if any(seed is None for seed in seeds):
        raise ValueError("replayed drafts by seed: every request must carry its prompt's index as its seed")
    return seeds


def replay_settled(
    run: Callable[[list[list[int]]], Run], continuations: list[list[int]], max_passes: int = 8
):
    """A replayed run (`run(fed)`, drafts replayed from `fed`) whose every row's output is what
    it was fed, and the passes that took.

    On a backend where a k-row verify computes bit for bit what one-row decoding does (MLX's
    CPU backend) every row's output is its plain continuation and one pass suffices; this is
    asserted. Where it does not (MLX CUDA: GEMM against GEMV rounding, amplified by a deep
    random network into flipped argmaxes at near ties), a row's output drifts from its plain
    one; that row is then fed its drifted output, with the same hits, until every row
    reproduces what it is fed, so that acceptance stays what the spec says."""
    fed = [list(c) for c in continuations]
    for passes in range(1, max_passes + 1):
        result = run(fed)
        drifted = [b for b, (out, want) in enumerate(zip(result.tokens, fed)) if out != want[: len(out)]]
        if not drifted:
            return result, passes
        assert mx.default_device() != mx.cpu, (
            f"rows {drifted}: on the CPU backend replayed output must equal plain"
        )
        for b in drifted:
            fed[b] = result.tokens[b]
    raise RuntimeError(f"the replay did not settle in {max_passes} passes (rows {drifted} drift)")
