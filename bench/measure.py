"""What the benchmark measures: cost curves, drafter steps, end-to-end decoding at controlled
acceptance (the replay harness), the mlx-lm baseline and peak memory.

Every timing is the median of `trials` runs after a warm-up, the work synchronised with the
host (`mx.eval` or a token read) inside the timed region.
"""

from __future__ import annotations

import importlib
import itertools
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.draft_length import Auto, Costs, DraftLength
from mlx_gemma_mtp.drafter import Drafter, compiled_step
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.speculative import (
    MAX_DRAFT,
    Draft,
    DraftRequest,
    DraftStats,
    drafter_proposer,
    greedy,
    plain_tokens,
    prefill,
    speculative_tokens,
)
from mlx_gemma_mtp.target import Target


def median_ms(fn, trials: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_tokens(n: int, vocab: int, seed: int) -> mx.array:
    return mx.array(np.random.RandomState(seed).randint(4, vocab, size=(1, n)), dtype=mx.int32)


def filled_cache(target: Target, context: int) -> list:
    cache = target.make_cache(room=MAX_DRAFT + 1)
    prefill(target, random_tokens(context, target.args.vocab_size, seed=1), cache)
    mx.eval([c.state for c in cache])
    return cache


def verify_costs(target: Target, context: int, lengths, trials: int, warmup: int = 2) -> tuple[dict, dict]:
    """ms of one target forward over L new tokens (argmax of every row, as a verify does), and
    of its Python part alone (building the lazy graph; the rest is launching and running it).

    The lengths are timed round-robin, one forward of each per trial, so a shared card's drift
    over the minutes this takes lands on every L alike (timed one L after another, a drift
    had made a 5-token verify cheaper than a 1-token one)."""
    cache = filled_cache(target, context)
    lengths = list(lengths)
    tokens = {L: random_tokens(L, target.args.vocab_size, seed=L) for L in lengths}
    times: dict[int, list[float]] = {L: [] for L in lengths}
    build_times: dict[int, list[float]] = {L: [] for L in lengths}
    for trial in range(warmup + trials):
        for L in lengths:
            start = time.perf_counter()
            out = greedy(target, target(tokens[L], cache))
            built = time.perf_counter()
            mx.eval(out)
            end = time.perf_counter()
            for c in cache:
                c.trim(L)
            if trial >= warmup:
                times[L].append((end - start) * 1e3)
                build_times[L].append((built - start) * 1e3)
    costs = {L: statistics.median(times[L]) for L in lengths}
    return costs, {L: statistics.median(build_times[L]) for L in lengths}


def drafter_costs(target: Target, drafter: Drafter, context: int, trials: int) -> dict[str, float]:
    """ms of one drafter step (compiled, as the loop runs it), with its own head and with the
    dense 262k-wide head, and of the dense one uncompiled."""
    cache = filled_cache(target, context)
    shared_kv = {kind: cache[layer].view() for kind, layer in target.kv_producers.items()}
    token = random_tokens(1, target.args.vocab_size, seed=2)
    hidden = mx.random.normal((1, 1, target.args.hidden_size)).astype(target.model.norm.weight.dtype)
    position = mx.array(cache[0].offset, mx.int32)

    def dense(h):
        return mx.argmax(drafter.logits(h), -1)

    def uncompiled():
        h, projected = drafter(mx.concatenate([target.embed(token), hidden], axis=-1), shared_kv, position)
        mx.eval(dense(h), projected)

    steps = {"dense": compiled_step(drafter, target.embed, dense)}
    if drafter.config.use_ordered_embeddings:
        steps["clustered"] = compiled_step(drafter, target.embed, drafter.greedy_token)
    costs = {}
    for name, step in steps.items():
        costs[name] = median_ms(lambda: mx.eval(step(token, hidden, position, shared_kv)), trials)
    return costs | {"dense_uncompiled": median_ms(uncompiled, trials)}


def drafter_head_bytes(drafter: Drafter) -> dict[str, int]:
    """Bytes a greedy head reads per step: the dense tied head reads the whole table; the
    clustered one the centroids plus the selected clusters' rows."""
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


def replay_proposer(drafter: Drafter, target: Target, continuation: list[int], alpha: float, seed: int):
    """The real drafter runs every step; its proposal is then replaced by the known
    continuation with probability alpha per position (else a wrong token).

    Which positions hit is drawn once, up front, and the replacement is gathered on the device
    at the round's position: the host never reads anything, so the rounds stay pipelined as
    they are with a real drafter."""
    real = drafter_proposer(drafter, target)
    rng = np.random.RandomState(seed)
    vocab = target.args.vocab_size
    known = np.array(continuation + [0] * (MAX_DRAFT + 1), dtype=np.int64)
    hits = rng.random_sample(known.shape[0]) < alpha
    replayed = mx.array(np.where(hits, known, (known + 1) % vocab), dtype=mx.int32)

    def propose(request: DraftRequest, cache: list) -> Draft:
        drafted = real(request, cache).tokens
        # continuation[g] follows the g-th emitted token; `generated` counts the round's first.
        indices = request.generated + mx.arange(request.k, dtype=mx.int32)
        # `drafted * 0` keeps the drafter's work in the graph: it is computed, then discarded.
        # q=None: the replayed tokens are deterministic (greedy runs only).
        return Draft(tokens=mx.take(replayed, indices)[None] + drafted * 0)

    return propose


@dataclass(frozen=True)
class Run:
    tokens: list[int]
    ms_per_token: float
    stats: DraftStats
    peak_gb: float
    policy: DraftLength | int | None = None  # what chose the draft lengths, as it ended


def _timed(make_tokens, n: int, stats: DraftStats, policy: DraftLength | int | None = None) -> Run:
    mx.reset_peak_memory()
    tokens = make_tokens()
    first = next(tokens)[0]  # prefill excluded from the timing
    start = time.perf_counter()
    rest = [t for t, _ in itertools.islice(tokens, n - 1)]
    elapsed = time.perf_counter() - start
    tokens.close()
    return Run([first] + rest, elapsed * 1e3 / (n - 1), stats, mx.get_peak_memory() / 1e9, policy)


def plain_generator(target: Target, prompt: mx.array):
    """Our plain decoding from `prompt` on a fresh cache."""
    return plain_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1))


def plain_run(target: Target, prompt: mx.array, n: int) -> Run:
    return _timed(lambda: plain_generator(target, prompt), n, DraftStats())


def replay_generator(target, drafter, prompt, continuation, alpha, num_draft, n, stats, seed=0):
    """The speculative loop on a fresh cache, its drafts replayed (`replay_proposer`)."""
    propose = replay_proposer(drafter, target, continuation, alpha, seed)
    return speculative_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1), propose, num_draft, n, stats)


def replay_run(target, drafter, prompt, continuation, alpha, k: int | str, n, seed=0) -> Run:
    """k: drafts per round, or "auto" / "heuristic" (a fresh policy per run)."""
    stats = DraftStats()
    num_draft = draft_length(k, target, drafter) if isinstance(k, str) else k

    def make():
        return replay_generator(target, drafter, prompt, continuation, alpha, num_draft, n, stats, seed)

    return _timed(make, n, stats, num_draft)


def mlx_lm_generator(target: Target, prompt: mx.array, n: int):
    """mlx-lm's own generate_step on the same weights (its model class, its caches), yielding
    (token, False) as our generators do."""
    gemma4_text = importlib.import_module("mlx_lm.models.gemma4_text")
    generate = importlib.import_module("mlx_lm.generate")
    model = gemma4_text.Model(target.args)
    model.model = target.model  # share the weights; the fresh random ones were never evaluated
    steps = generate.generate_step(prompt[0], model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1))
    return ((int(t), False) for t, _ in steps)


def mlx_lm_run(target: Target, prompt: mx.array, n: int) -> Run:
    return _timed(lambda: mlx_lm_generator(target, prompt, n), n, DraftStats())


def costs_ms(costs: Costs) -> dict:
    """The costs auto starts from, in ms: plain, verify[k], draft."""
    return {"plain": costs.plain * 1e3, "verify": [s * 1e3 for s in costs.verify], "draft": costs.draft * 1e3}


def auto_costs_ms(policy: Auto) -> dict:
    """What auto started from (the measured costs) and what it learnt from the clock, in ms
    per round of each k (k = 0: per plain token)."""
    measured = {k: policy.costs.round(k) * 1e3 for k in range(MAX_DRAFT + 1)}
    return {"measured": measured, "observed": {k: s * 1e3 for k, s in sorted(policy.observed.items())}}


def ideal_speedup(alpha: float, k: int, plain: float, round_cost: float) -> float:
    """Leviathan et al. 2023: expected tokens per round of k drafts over the round's cost,
    against plain decoding at `plain` per token (any unit, the same for both)."""
    tokens = k + 1 if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens * plain / round_cost


def predicted_speedup(k_histogram: list[int], costs: Costs, tokens: int) -> float:
    """Plain decoding's time for `tokens` over the time the rounds of `k_histogram` (rounds
    per k, k = 0 a plain step) cost at `costs`."""
    return tokens * costs.plain / sum(n * costs.round(k) for k, n in enumerate(k_histogram))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
