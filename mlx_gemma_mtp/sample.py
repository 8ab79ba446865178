"""Sampling: the distribution a token is drawn from, and the speculative acceptance rule.

`Sampling` turns logits into the log-probabilities of what is sampled, with mlx-lm's meaning
of every parameter (sample_utils.py, mlx-lm 0.32.2): logits processors (repetition penalty
first, then the caller's) on the raw logits, log-softmax, then top-p, min-p and top-k on the
log-probabilities, then the temperature. Temperature 0 is greedy: the argmax of the processed
logits. The target's p and the drafter's q go through the same `Sampling`.

`judge` is the acceptance rule of speculative sampling (Leviathan et al. 2023, Algorithm 1;
Chen et al. 2023), for every drafted position at once so that a round needs one host sync:
draft i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token
is drawn from normalise(max(0, p_i - q_i)); when every draft is kept, the bonus token comes from
p_k. Then each emitted token is distributed exactly as p, whatever q is, as long as the drafts
really were drawn from q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

# mlx-lm's logits processor: (tokens so far [n], logits [1, V]) -> logits [1, V].
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a token is drawn from logits; build it with `make_sampling`."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept; 0 or 1: off (mlx-lm: applied when 0 < top_p < 1)
    top_k: int = 0  # most probable tokens kept; 0: off
    min_p: float = 0.0  # tokens below min_p * max probability dropped; 0: off
    processors: tuple[LogitsProcessor, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def process(self, logits: mx.array, history: mx.array | None, drafts: mx.array | None = None) -> mx.array:
        """Logits processors on L rows of logits [L, N].

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
        """Processed logits [..., N] -> float32 log-probabilities of the sampled distribution.

        A row may be a subset of the vocabulary (the clustered drafter's candidates): then top-k
        keeps the top k of the subset, and top-p / min-p act on the subset's own distribution.
        """
        logp = logits.astype(mx.float32)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        if 0 < self.top_p < 1:
            logp = apply_top_p(logp, self.top_p)
        if self.min_p > 0:
            logp = apply_min_p(logp, self.min_p)
        if 0 < self.top_k < logp.shape[-1]:
            logp = apply_top_k(logp, self.top_k)
        logp = logp * (1.0 / self.temperature)
        return logp - mx.logsumexp(logp, axis=-1, keepdims=True)

    def pick(self, logits: mx.array, key: mx.array | None) -> mx.array:
        """One token per row of processed logits [L, N]: [L] (argmax when greedy)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return mx.random.categorical(self.log_probs(logits), key=key)


GREEDY = Sampling()


def make_sampling(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logits_processors: list[LogitsProcessor] | None = None,
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
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        min_p=float(min_p),
        processors=tuple(processors) + tuple(logits_processors or ()),
    )


def _check(name: str, value, ok: Callable[[float], bool], what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def random_key(seed: int | None) -> mx.array:
    """A PRNG key: from `seed`, or drawn from MLX's global generator (so mx.random.seed applies)."""
    if seed is not None:
        return mx.random.key(seed)
    return mx.random.randint(0, 2**31 - 1, shape=(2,)).astype(mx.uint32)


# ---------------------------------------------------------------------------------------------
# Speculative sampling


def draft_probability(q: mx.array, q_ids: mx.array | None, drafts: mx.array) -> mx.array:
    """q_i(x_i) for each draft: q [k, N] over the ids q_ids [k, N] (None: N = vocab), drafts [k]."""
    if q_ids is None:
        return mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    return mx.sum(mx.where(q_ids == drafts[:, None], q, 0.0), axis=-1)


def residual(p: mx.array, q: mx.array, q_ids: mx.array | None) -> mx.array:
    """max(0, p - q) per row, unnormalised: p [k, V]; q [k, N] over distinct ids q_ids [k, N]
    (None: N = V). Where q is zero outside q_ids the residual is p itself, so a q over a few
    candidates never becomes a vocabulary-wide row. A row whose residual is all zero (p == q,
    where a rejection has probability 0) falls back to p."""
    if q_ids is None:
        r = mx.maximum(p - q, 0.0)
    else:
        at = mx.take_along_axis(p, q_ids, axis=-1)  # [k, N]
        r = mx.put_along_axis(p, q_ids, mx.maximum(at - q, 0.0), axis=-1)
    return mx.where(mx.sum(r, axis=-1, keepdims=True) > 0, r, p)


def judge(
    logp: mx.array,
    drafts: mx.array,
    q: mx.array | None,
    q_ids: mx.array | None,
    key: mx.array,
) -> tuple[mx.array, mx.array]:
    """The acceptance rule for a round of k drafts, lazily (no host sync).

    logp: [k+1, V] the target's log-probabilities (`Sampling.log_probs`) at the k drafted
        positions and the one after them.
    drafts: [k] the drafted tokens; q: [k, N] the probabilities they were drawn from, over
        the token ids q_ids [k, N] (None: the whole vocabulary, N = V). q None: deterministic
        drafts (a point mass on each), as scripted proposals are.
    Returns (kept [k] bool: u_i * q_i(x_i) < p_i(x_i) with u_i uniform; the first False is the
    first rejection), (tokens [k+1]: at i < k a draw from the residual of position i, at k a
    draw from p_k). The round emits drafts[:m] and then tokens[m], m = the first rejection
    (or k).
    """
    k = drafts.shape[0]
    if q is None:
        q, q_ids = mx.ones((k, 1), mx.float32), drafts[:, None]
    p = mx.exp(logp.astype(mx.float32))  # [k+1, V]
    p_drafts = mx.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
    u_key, r_key = mx.random.split(key)
    u = mx.random.uniform(shape=(k,), key=u_key)
    kept = u * draft_probability(q.astype(mx.float32), q_ids, drafts) < p_drafts
    rows = mx.concatenate([residual(p[:k], q.astype(mx.float32), q_ids), p[k:]], axis=0)
    return kept, mx.random.categorical(mx.log(rows), key=r_key)
