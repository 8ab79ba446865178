"""What the benchmark measures: the batched cost surface (B rows x L new tokens), the drafter
step at batch B, timed engine runs (speculative, or our batched plain decoding), mlx-lm's own
batched generation on the same weights, peak memory, and Leviathan's ideal from the costs.

Costs are medians of `trials` after a warm-up, the work synchronised with the host inside the
timed region; a verify is timed both queued behind others, as the engine's pipeline runs it,
and alone. Runs are timed from the moment every row has its first token (prefill excluded):
aggregate tokens per second over all rows, to the last token and while the batch is full (until
the first row is done: rows that keep different shares of their drafts finish at different
rounds, and a fixed-length run ends with its slowest rows alone, a tail a server with rows
coming and going does not have; Leviathan's ideal models the full batch).
"""

from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.cache import MAX_WRITE, Cache
from mlx_gemma_mtp.draft_length import MAX_DRAFT, Auto, DraftLength
from mlx_gemma_mtp.drafter import Drafter
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.sample import GREEDY, Sampling
from mlx_gemma_mtp.speculative import Proposer, Rows, prefill
from mlx_gemma_mtp.target import Target

DRAFT_SPAN = 3  # a drafter step's cost: (a proposal of 1 + 3 steps - one of 1 step) / 3
CHAIN_SPAN = 3  # a pipelined forward's cost: (a chain of 1 + 3 forwards - a chain of 1) / 3


def median_ms(fn, trials: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_prompts(rows: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Distinct random prompts, one per row (a MoE routes distinct tokens apart)."""
    rng = np.random.RandomState(seed)
    return [rng.randint(4, vocab, size=length).tolist() for _ in range(rows)]


# ---------------------------------------------------------------------------------------------
# The cost surface


def filled_rows(target: Target, prompts: list[list[int]]) -> Rows:
    """The rows of a batch right after each prompt's prefill (each row prefilled alone, as the
    engine does), greedy, their token a fixed id."""
    parts = []
    for i, prompt in enumerate(prompts):
        cache = target.make_cache()
        hidden = prefill(target, prompt, cache)
        mx.eval(hidden, cache.state)
        token = mx.array([[(prompt[-1] + 1) % target.args.vocab_size]], dtype=mx.int32)
        parts.append(Rows([i], cache, token, hidden, [GREEDY], mx.zeros((1, 2), mx.uint32), [None]))
    rows = Rows.join(parts)
    mx.eval(rows.hidden, rows.cache.state)
    return rows


def place(cache: Cache, position: int, exact: bool) -> None:
    """Every row at `position`, as the engine has it: known to the host in plain decoding
    (`exact`: slice writes, no full-attention mask), a device vector behind a drafting round
    (scattered writes, additive masks)."""
    rows = cache.rows
    if exact:
        cache.seek([position] * rows)
    else:
        cache.seek(mx.array([position] * rows, dtype=mx.int32), [position - 1] * rows, [position] * rows)


def forward_ms(target: Target, cache: Cache, tokens: mx.array, context: int) -> float:
    """ms of one forward of tokens [B, L] and the argmax of every position (what a verify or a
    plain step computes), the cache placed at `context` as the engine would have it."""
    return chain_ms(target, cache, tokens, context, 1, exact=tokens.shape[1] == 1)


def chain_ms(
    target: Target, cache: Cache, tokens: mx.array, context: int, forwards: int, exact: bool
) -> float:
    """ms of `forwards` such forwards queued back to back, each one's argmax the next one's
    tokens and nothing read between them: the host builds a forward while the device runs the
    one before, as in the engine's pipeline. `exact`: positions known to the host (`place`)."""
    start = time.perf_counter()
    for _ in range(forwards):
        place(cache, context, exact)
        tokens = mx.argmax(target.logits(target(tokens, cache)), axis=-1).astype(mx.int32)
        mx.async_eval(tokens)
    mx.eval(tokens)
    return (time.perf_counter() - start) * 1e3


def verify_costs(
    target: Target, context: int, batch: int, lengths, trials: int, warmup: int = 2
) -> tuple[dict, dict]:
    """ms of one target forward of `batch` rows x L new tokens after `context` positions per
    row, for each L; "1r": L = 1 with device positions (plain steps among ragged rows).

    Two readings of each: in a full pipeline (a chain of 1 + CHAIN_SPAN forwards less a chain
    of 1, over CHAIN_SPAN: what the engine's pipelined steps pay, host time hidden where the
    device takes longer), and alone (a chain of 1: host time and the wait included). The
    lengths are timed round-robin, each once per trial, so a shared card's drift lands on
    every L alike (timed one L after another, a drift had made a 5-token verify cheaper than a
    1-token one)."""
    vocab = target.args.vocab_size
    rows = filled_rows(target, random_prompts(batch, context, vocab, seed=1))
    cells = {str(L): (mx.array(random_prompts(batch, L, vocab, seed=L)), L == 1) for L in lengths}
    cells["1r"] = (cells["1"][0], False)
    piped: dict[str, list[float]] = {name: [] for name in cells}
    alone: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(warmup + trials):
        for name, (tokens, exact) in cells.items():
            one = chain_ms(target, rows.cache, tokens, context, 1, exact)
            many = chain_ms(target, rows.cache, tokens, context, 1 + CHAIN_SPAN, exact)
            alone[name].append(one)
            piped[name].append(max(many - one, 0.0) / CHAIN_SPAN)
    return tuple(
        {name: statistics.median(ms[warmup:]) for name, ms in times.items()} for times in (piped, alone)
    )


def drafter_costs(target: Target, proposer: Proposer, context: int, batch: int, trials: int) -> dict:
    """ms of the loop's proposal for `batch` rows: "step", what one more drafter step adds to a
    proposal ((1 + DRAFT_SPAN steps - 1 step) / DRAFT_SPAN, each proposal evaluated alone);
    "one": a proposal of one step (the views and the wait included)."""
    rows = filled_rows(target, random_prompts(batch, context, target.args.vocab_size, seed=2))
    place(rows.cache, context, exact=False)

    def propose(k: int):
        return lambda: mx.eval(proposer(rows, k).tokens)

    one = median_ms(propose(1), trials)
    many = median_ms(propose(1 + DRAFT_SPAN), trials)
    return {"step": max(many - one, 0.0) / DRAFT_SPAN, "one": one}


def drafter_head_bytes(drafter: Drafter) -> dict[str, int]:
    """Bytes a greedy head reads per row and step: the dense tied head reads the whole table;
    the clustered one the centroids plus the selected clusters' rows."""
    table = drafter.model.embed_tokens
    row_bytes = table.weight.nbytes // table.weight.shape[0]
    if hasattr(table, "scales"):
        row_bytes += (table.scales.nbytes + table.biases.nbytes) // table.scales.shape[0]
    vocab = drafter.args.vocab_size
    out = {"dense": row_bytes * vocab}
    if drafter.config.use_ordered_embeddings:
        head = drafter.masked_embedding
        selected = head.top_k * vocab // head.num_centroids
        out["clustered"] = head.centroids.weight.nbytes + selected * row_bytes
    return out


# ---------------------------------------------------------------------------------------------
# Leviathan's ideal


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Tokens a round of k drafts yields on average: 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k,
    a_i the chance that draft i is accepted once drafts 1..i-1 were (Leviathan et al. 2023)."""
    total, reach = 1.0, 1.0
    for a in acceptance[:k]:
        reach *= a
        total += reach
    return total


def ideal_speedup(rows: list[list[float]], k: int, plain_ms: float, round_ms: float) -> float:
    """Tokens per second of rounds of k drafts over batched plain decoding's: every row's
    expected tokens per round (rows may differ: no clamping), at `round_ms` per round against
    one token per row at `plain_ms` per step."""
    if not k:
        return 1.0
    return statistics.mean(expected_tokens(a, k) for a in rows) * plain_ms / round_ms


def best_ideal(rows: list[list[float]], verify_ms: dict, draft_ms: float) -> tuple[int, float]:
    """The best fixed k (0: plain decoding) by `ideal_speedup` over the lengths the surface
    holds, with its speedup; verify_ms[str(L)]: a forward of L = k + 1 tokens per row."""
    ks = [int(L) - 1 for L in verify_ms if L.isdigit()]
    speedups = {k: ideal_speedup(rows, k, verify_ms["1"], round_ms(verify_ms, draft_ms, k)) for k in ks}
    best = max(speedups, key=speedups.__getitem__)
    return best, speedups[best]


def round_ms(verify_ms: dict, draft_ms: float, k: int) -> float:
    return verify_ms[str(k + 1)] + k * draft_ms


# ---------------------------------------------------------------------------------------------
# Timed runs


@dataclass(frozen=True)
class Run:
    """One engine (or mlx-lm) run of every row to `n` tokens."""

    tokens: list[list[int]]  # per row
    seconds: float  # from every row's first token to the last token
    generated: int  # tokens in that time, all rows together
    full_seconds: float  # from every row's first token to the step the first row finished in
    full_generated: int  # tokens in that time, all rows together
    peak_gb: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # row-rounds that drafted (a row's share of a drafting round)
    draft_lengths: list[int] = field(default_factory=lambda: [0] * (MAX_DRAFT + 1))  # row-rounds per k
    steps: int = 0  # steps read back in `seconds` (an engine's: one round of the batch each)
    shadows: int = 0  # the engine's plain steps that carried a shadow (the whole run, untimed steps too)
    waited: float = 0.0  # of `seconds`, what the engine's read-backs waited for the device
    full_step_ms: float = 0.0  # the median step while every row decoded (to the first row's end)
    tail_step_ms: float | None = None  # ... and after it, with fewer rows (None: rows ended together)
    tail_steps: int = 0  # steps after it
    # Auto's: ms of a round of the batch at k = 0..MAX_DRAFT as its cost model had it at the run's
    # end (`CostModel.seconds`), and as its measured costs said before any timing (`Costs.round`).
    believed_ms: list[float] | None = None
    calibrated_ms: list[float] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds

    @property
    def ms_per_row_token(self) -> float:
        return self.seconds * 1e3 / self.generated

    @property
    def full_tokens_per_s(self) -> float:
        """Tokens per second while every row decoded."""
        return self.full_generated / self.full_seconds


def engine_run(
    target: Target,
    drafter: Drafter | None,
    prompts: list[list[int]],
    n: int,
    k: int | str | DraftLength,
    propose: Proposer | None = None,
    sampling: Sampling = GREEDY,
    steps: list | None = None,
) -> Run:
    """Every prompt through one engine (one batch) to n tokens each, no stop ids. k: drafts per
    round (0: our plain decoding), "auto" / "heuristic" (a fresh policy). steps: gets each
    timed step's (ms, tokens, kept drafts, rows), all rows together."""
    policy = draft_length(k, target, drafter, len(prompts)) if isinstance(k, str) else k
    engine = Engine(target, drafter, num_draft_tokens=policy, max_batch=len(prompts), propose=propose)
    for prompt in prompts:
        engine.add(Request(prompt=prompt, max_tokens=n, sampling=sampling, stop_ids=frozenset()))
    mx.reset_peak_memory()
    tokens, usage, clock = [[] for _ in prompts], {}, _Clock(steps)
    while engine.busy:
        events = engine.step()
        for event in events:
            tokens[event.rid] += event.tokens
            usage[event.rid] = event.usage
        kept = sum(sum(e.from_draft) for e in events)
        clock.tick(
            all(tokens),
            sum(len(e.tokens) for e in events),
            kept,
            any(e.finish_reason for e in events),
            engine.device_wait,
            rows=sum(bool(e.tokens) for e in events),
        )
    return _run(tokens, clock, list(usage.values()), engine.policy, len(prompts), engine.shadows)


class _Clock:
    """A run's clock: it starts once every row has its first token (prefill over) and then
    counts the tokens of every step, timing each into `steps` (ms, tokens, kept drafts, rows that
    got tokens); `full`: (seconds, tokens) up to the step in which the first row finished;
    `phases`: the steps' ms up to that step and after it; `waited`: of the time, what the steps
    waited for the device (`Engine.device_wait`)."""

    def __init__(self, steps: list | None):
        self.steps, self.start, self.last, self.generated, self.ticks = steps, None, None, 0, 0
        self.full: tuple[float, int] | None = None
        self.waited = 0.0
        self.phases: tuple[list[float], list[float]] = ([], [])  # step ms: to the first end, after

    def tick(
        self, started: bool, tokens: int, kept: int, finished: bool, waited: float = 0.0, rows: int = 0
    ) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = self.last = now if started else None
            return
        self.generated += tokens
        self.ticks += 1
        self.waited += waited
        if self.steps is not None:
            self.steps.append(((now - self.last) * 1e3, tokens, kept, rows))
        self.phases[self.full is not None].append((now - self.last) * 1e3)
        self.last = now
        if finished and self.full is None:
            self.full = (now - self.start, self.generated)


def _run(tokens, clock: _Clock, usages, policy=None, batch: int = 0, shadows: int = 0) -> Run:
    beliefs = {}
    if isinstance(policy, Auto):  # what its choices rested on
        beliefs = {
            "believed_ms": [policy.cost.seconds(k, batch) * 1e3 for k in range(MAX_DRAFT + 1)],
            "calibrated_ms": [policy.cost.costs.round(k, batch) * 1e3 for k in range(MAX_DRAFT + 1)],
        }
    return Run(
        tokens=tokens, seconds=clock.last - clock.start, generated=clock.generated,
        full_seconds=clock.full[0], full_generated=clock.full[1], peak_gb=mx.get_peak_memory() / 1e9,
        drafted=sum(u.drafted for u in usages), accepted=sum(u.accepted for u in usages),
        rounds=sum(u.rounds for u in usages),
        draft_lengths=[sum(column) for column in zip(*(u.draft_lengths for u in usages))] or [0] * (MAX_DRAFT + 1),
        steps=clock.ticks, waited=clock.waited, shadows=shadows,
        full_step_ms=statistics.median(clock.phases[0]) if clock.phases[0] else 0.0,
        tail_step_ms=statistics.median(clock.phases[1]) if clock.phases[1] else None,
        tail_steps=len(clock.phases[1]),
        **beliefs,
    )  # fmt: skip


def mlx_lm_model(target: Target):
    """mlx-lm's own gemma4_text model class on `target`'s weights (shared, not copied)."""
    gemma4_text = importlib.import_module("mlx_lm.models.gemma4_text")
    model = gemma4_text.Model(target.args)
    model.model = target.model  # the fresh random weights were never evaluated
    return model


def mlx_lm_run(model, prompts: list[list[int]], n: int, steps: list | None = None) -> Run:
    """mlx-lm's batched generation (its `BatchGenerator`, what its `batch_generate` and server
    run; mlx_lm/generate.py 0.32.2), greedy, to n tokens per row, all rows in one batch.
    steps: as `engine_run`'s."""
    generate = importlib.import_module("mlx_lm.generate")
    B = len(prompts)
    gen = generate.BatchGenerator(
        model, max_tokens=n, completion_batch_size=B, prefill_batch_size=B, prefill_step_size=MAX_WRITE
    )
    mx.reset_peak_memory()
    uids = gen.insert(prompts, [n] * B)
    tokens = {uid: [] for uid in uids}
    clock = _Clock(steps)
    try:
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
            finished = any(r.finish_reason for r in responses)
            clock.tick(all(tokens.values()), len(responses), 0, finished, rows=len(responses))
    finally:
        gen.close()
    return _run([tokens[uid] for uid in uids], clock, [])


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
