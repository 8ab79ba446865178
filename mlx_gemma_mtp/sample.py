"""Sampling: the distribution a token is drawn from, the random numbers, and the acceptance rule.

`Sampling` is one request's settings, with mlx-lm's meaning of every parameter (sample_utils.py,
mlx-lm 0.32.2): logits processors (repetition penalty first, then the caller's) on the raw
logits, log-softmax, then top-p, min-p and top-k on the log-probabilities, then the temperature.
Temperature 0 is greedy: the argmax of the processed logits. The target's p and the drafter's q
go through the same settings. Rows of a batch carry their own (`RowSampling`).

Random numbers are a function of a row's seed, the position of the token they decide and what
they decide (a draft, its acceptance, a token drawn from p or a residual): counter-based, so a
seeded row draws the same numbers whatever its neighbours in a batch hold.

`judge` is the acceptance rule of speculative sampling (Leviathan et al. 2023, Algorithm 1;
Chen et al. 2023) for every drafted position of every row at once, so that a round needs one
host sync: draft i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
the token is drawn from normalise(max(0, p_i - q_i)); when every draft is kept, the bonus token
comes from p_k. Each emitted token is then distributed exactly as p, as long as the drafts really
were drawn from q.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

# mlx-lm's logits processor: (tokens so far [n], logits [1, V]) -> logits [1, V].
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

SEED_LIMIT = 2**64  # seeds are 64-bit: two words of the counter-based generator

# What a random number decides, mixed into its counter.
DRAFT, ACCEPT, PICK = 1, 2, 3


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How one request's tokens are drawn from logits; build it with `make_sampling`."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept; 0 or 1: off (mlx-lm: applied when 0 < top_p < 1)
    top_k: int = 0  # most probable tokens kept; 0: off
    min_p: float = 0.0  # tokens below min_p * max probability dropped; 0: off
    processors: tuple[LogitsProcessor, ...] = ()
    seed: int | None = None  # None: drawn from MLX's global generator when the request starts

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def process(self, logits: mx.array, history: mx.array | None, drafts: mx.array | None = None) -> mx.array:
        """Logits processors on L rows of logits [L, N] of one sequence.

        Row i continues `history` [n] (every token so far, the fed token last) with the first
        i of `drafts` [L-1] (the rows of a verify forward). Without processors: `logits`.
        """
        if not self.processors:
            return logits
        rows = []
        for i in range(logits.shape[0]):
            seen = history if i == 0 else mx.concatenate([history, drafts[:i]])
            row = logits[i : i + 1]
            for processor in self.processors:
                row = processor(seen, row)
            rows.append(row)
        return mx.concatenate(rows, axis=0)

    def log_probs(self, logits: mx.array) -> mx.array:
        """Processed logits [..., N] -> float32 log-probabilities of the sampled distribution."""
        return filtered_log_probs(logits, self)


GREEDY = Sampling()


def make_sampling(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logits_processors: list[LogitsProcessor] | None = None,
    seed: int | None = None,
) -> Sampling:
    """A `Sampling` from the user-facing parameters; raises ValueError naming a bad one."""
    _check("temperature", temperature, lambda v: v >= 0, "a number >= 0")
    _check("top_p", top_p, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _check("min_p", min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if repetition_penalty is not None:
        _check("repetition_penalty", repetition_penalty, lambda v: v > 0, "a number > 0 (or None)")
    if not isinstance(repetition_context_size, int) or repetition_context_size <= 0:
        raise ValueError(f"repetition_context_size must be a positive int, got {repetition_context_size!r}")
    if logits_processors is not None and not all(callable(p) for p in logits_processors):
        raise ValueError("logits_processors must be a list of callables (tokens, logits) -> logits")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT
    ):
        raise ValueError(f"seed must be an int in 0..2**64-1 (or None), got {seed!r}")
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        min_p=float(min_p),
        processors=tuple(processors) + tuple(logits_processors or ()),
        seed=seed,
    )


def _check(name: str, value, ok: Callable[[float], bool], what: str) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def filtered_log_probs(logits: mx.array, settings: Sampling | Sequence[Sampling]) -> mx.array:
    """Logits [..., N] -> float32 log-probabilities after top-p, min-p, top-k and the
    temperature of `settings`: one Sampling for every row, or one per row (a sequence as long
    as logits' first axis). A row's filter is off where mlx-lm's is (top_p 0 or 1, min_p 0,
    top_k 0 or >= N). A row may be a subset of the vocabulary (the clustered drafter's
    candidates): the filters then act on the subset's own distribution."""
    rows = [settings] if isinstance(settings, Sampling) else list(settings)
    shape = (1,) * logits.ndim if isinstance(settings, Sampling) else (len(rows),) + (1,) * (logits.ndim - 1)

    def param(name: str, dtype=mx.float32) -> mx.array:
        return mx.array([getattr(s, name) for s in rows], dtype=dtype).reshape(shape)

    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    N = logp.shape[-1]
    if any(0 < s.top_p < 1 for s in rows):
        top_p = param("top_p")
        ascending = mx.sort(logp, axis=-1)
        probs = mx.exp(ascending)
        mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
        total = mass_above[..., :1] + probs[..., :1]
        dropped = mx.sum(mass_above >= top_p * total, axis=-1, keepdims=True)
        threshold = mx.take_along_axis(ascending, dropped, axis=-1)
        logp = mx.where((top_p > 0) & (top_p < 1) & (logp < threshold), -mx.inf, logp)
    if any(s.min_p > 0 for s in rows):
        floor = mx.max(logp, axis=-1, keepdims=True) + mx.log(param("min_p"))  # log 0: no floor
        logp = mx.where(logp < floor, -mx.inf, logp)
    if any(0 < s.top_k < N for s in rows):
        top_k = param("top_k", mx.int32)
        descending = -mx.sort(-logp, axis=-1)
        index = mx.broadcast_to(mx.clip(top_k - 1, 0, N - 1), logp.shape[:-1] + (1,))
        kth = mx.take_along_axis(descending, index, axis=-1)  # ties with the k-th are kept
        logp = mx.where((top_k > 0) & (top_k < N) & (logp < kth), -mx.inf, logp)
    temperature = param("temperature")
    logp = logp / mx.where(temperature > 0, temperature, 1.0)  # greedy rows: argmax of the processed logits
    return logp - mx.logsumexp(logp, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed as the generator's two 32-bit words."""
    return seed & 0xFFFFFFFF, seed >> 32


def random_seed() -> int:
    """A seed drawn from MLX's global generator (so mx.random.seed makes it reproducible)."""
    low, high = mx.random.randint(0, 2**31 - 1, shape=(2,)).tolist()
    return low | high << 32


def _mix(x: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 that scrambles every bit."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x85EBCA6B, mx.uint32)
    x = x ^ (x >> 13)
    x = x * mx.array(0xC2B2AE35, mx.uint32)
    return x ^ (x >> 16)


def _counter(seeds: mx.array, positions: mx.array, what: int) -> mx.array:
    """[B, L] uint32: one stream per (row seed [B, 2], position [B, L], purpose)."""
    position = positions.astype(mx.uint32) * mx.array(0x9E3779B1, mx.uint32) + mx.array(what, mx.uint32)
    h = _mix(seeds[:, 1:2] ^ _mix(position))
    return _mix(seeds[:, 0:1] ^ h)


def uniform(seeds: mx.array, positions: mx.array, what: int, n: int | None = None) -> mx.array:
    """Uniform floats in (0, 1), [B, L] (or [B, L, n]: n per counter), from each row's seed
    [B, 2] uint32, the positions [B, L] of the tokens they decide and their purpose."""
    h = _counter(seeds, positions, what)
    if n is not None:
        index = mx.arange(n, dtype=mx.uint32) * mx.array(0xCC9E2D51, mx.uint32)
        h = _mix(h[..., None] ^ _mix(index))
    return ((h >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))


def categorical(logp: mx.array, seeds: mx.array, positions: mx.array, what: int) -> mx.array:
    """A draw from each row of log-probabilities logp [B, L, N] (Gumbel-max), [B, L] int32."""
    gumbel = -mx.log(-mx.log(uniform(seeds, positions, what, logp.shape[-1])))
    return mx.argmax(logp + gumbel, axis=-1).astype(mx.int32)


# ---------------------------------------------------------------------------------------------
# Speculative sampling


def draft_probability(q: mx.array, q_ids: mx.array | None, drafts: mx.array) -> mx.array:
    """q_i(x_i) for each draft: q [..., N] over the ids q_ids [..., N] (None: N = vocab), drafts [...]."""
    if q_ids is None:
        return mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    return mx.sum(mx.where(q_ids == drafts[..., None], q, 0.0), axis=-1)


def residual(p: mx.array, q: mx.array, q_ids: mx.array | None) -> mx.array:
    """max(0, p - q) per row, unnormalised: p [..., V]; q [..., N] over distinct ids q_ids
    [..., N] (None: N = V). Where q is zero outside q_ids the residual is p itself, so a q over a
    few candidates never becomes a vocabulary-wide row. A row whose residual is all zero
    (p == q, where a rejection has probability 0) falls back to p."""
    if q_ids is None:
        r = mx.maximum(p - q, 0.0)
    else:
        at = mx.take_along_axis(p, q_ids, axis=-1)  # [..., N]
        r = mx.put_along_axis(p, q_ids, mx.maximum(at - q, 0.0), axis=-1)
    return mx.where(mx.sum(r, axis=-1, keepdims=True) > 0, r, p)


def judge(
    logp: mx.array,
    drafts: mx.array,
    q: mx.array | None,
    q_ids: mx.array | None,
    seeds: mx.array,
    first: mx.array,
) -> tuple[mx.array, mx.array]:
    """The acceptance rule for a round of k drafts per row, lazily (no host sync).

    logp: [B, k+1, V] the target's log-probabilities at the k drafted positions and the one
        after them. drafts: [B, k]; q: [B, k, N] the probabilities they were drawn from, over
        the token ids q_ids [B, k, N] (None: the whole vocabulary); q None: deterministic
        drafts (a point mass on each). seeds [B, 2] and first [B], the position of each row's
        first draft: where the random numbers come from.
    Returns (kept [B, k] bool: u_i q_i(x_i) < p_i(x_i); the first False is the first
    rejection), (tokens [B, k+1]: at i < k a draw from the residual of position i, at k a
    draw from p_k). A row emits drafts[:m] and then tokens[m], m = its first rejection (or k).
    """
    k = drafts.shape[1]
    q, q_ids = _drawn_from(q, q_ids, drafts)
    positions = first[:, None] + mx.arange(k + 1, dtype=mx.int32)  # [B, k+1]
    p = mx.exp(logp.astype(mx.float32))
    kept = keeps(p[:, :k], drafts, q, q_ids, seeds, first)
    rows = mx.concatenate([residual(p[:, :k], q.astype(mx.float32), q_ids), p[:, k:]], axis=1)
    return kept, categorical(mx.log(rows), seeds, positions, PICK)


def keeps(
    p: mx.array,
    drafts: mx.array,
    q: mx.array | None,
    q_ids: mx.array | None,
    seeds: mx.array,
    first: mx.array,
) -> mx.array:
    """`judge`'s verdicts alone, [B, k] bool: u_i q_i(x_i) < p_i(x_i), from the target's
    probabilities p [B, k, V] at the drafted positions (the rest as `judge`'s)."""
    q, q_ids = _drawn_from(q, q_ids, drafts)
    p_drafts = mx.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]
    u = uniform(seeds, first[:, None] + mx.arange(drafts.shape[1], dtype=mx.int32), ACCEPT)
    return u * draft_probability(q.astype(mx.float32), q_ids, drafts) < p_drafts


def _drawn_from(
    q: mx.array | None, q_ids: mx.array | None, drafts: mx.array
) -> tuple[mx.array, mx.array | None]:
    """(q, q_ids) the drafts were drawn from; q None (deterministic drafts): a point mass on each."""
    if q is None:
        return mx.ones(drafts.shape + (1,), mx.float32), drafts[..., None]
    return q, q_ids
