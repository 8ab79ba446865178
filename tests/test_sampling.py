"""Speculative sampling draws exactly the target's own distribution.

Three levels: the acceptance rule as exact arithmetic on synthetic p and q; the rule as drawn
on device (hundreds of thousands of synthetic positions at once); whole generations of the tiny
fixtures — thousands of independent 3-token continuations, their joint distribution against the
target's, enumerated exactly. Every distribution is judged by one chi-square test at ALPHA, and
the same test must reject deliberately wrong variants: greedy drafts judged as if sampled
(q = softmax of the drafter's logits, as transformers' assisted sampling judges them) and a
rejected token redrawn from p instead of the residual. Transformers is not the oracle here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.sample_utils import make_sampler

from mlx_gemma_mtp import load, load_drafter, stream_generate
from mlx_gemma_mtp.sample import categorical, draft_probability, judge, make_sampling, residual
from mlx_gemma_mtp.speculative import Draft, Rows, prefill
from tests.fixtures import KINDS
from tests.run import decode

ALPHA = 1e-3  # significance of every test: a correct sampler fails one in a thousand seeds
DEPTH = 3  # tokens of each continuation whose joint distribution is tested
PROMPT = [2, 17, 230, 41, 99, 305, 12, 77]
# A tiny vocabulary per position (4 tokens, 64 joint outcomes); the temperature keeps them all likely.
SAMPLING = make_sampling(temperature=1.5, top_k=4)


def chi_square_pvalue(counts: Counter, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of observed outcome counts against exact probabilities
    (summing to 1): its p-value. Outcomes expected fewer than `min_expected` times are pooled;
    an observed outcome of probability 0 gives 0."""
    stat, dof = chi_square(counts, probs, min_expected)
    half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))  # the chi-square survival function


def chi_square(counts: Counter, probs: dict, min_expected: float = 5.0) -> tuple[float, int]:
    """(statistic, degrees of freedom) of `chi_square_pvalue`."""
    n = sum(counts.values())
    if any(probs.get(outcome, 0.0) == 0.0 for outcome in counts):
        return float("inf"), 1
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for outcome in sorted(probs, key=probs.get, reverse=True):
        if n * probs[outcome] >= min_expected:
            observed.append(counts[outcome])
            expected.append(n * probs[outcome])
        else:
            pooled_o, pooled_e = pooled_o + counts[outcome], pooled_e + n * probs[outcome]
    if pooled_e >= min_expected or not expected:
        observed.append(pooled_o)
        expected.append(pooled_e)
    else:  # too small to stand alone: fold into the least likely cell
        observed[-1] += pooled_o
        expected[-1] += pooled_e
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected)), len(expected) - 1


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _distribution(rng: np.random.RandomState, size: int, zeros: int = 0) -> np.ndarray:
    p = rng.dirichlet(np.full(size, 0.7)).astype(np.float32)
    p[rng.choice(size, zeros, replace=False)] = 0  # as top-k / top-p leave them
    return p / p.sum()


# ---------------------------------------------------------------------------------------------
# The rule on synthetic p and q


@pytest.mark.parametrize("clustered", [False, True])
def test_rule_reproduces_p_exactly(clustered):
    """P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x) / sum(r) = p(x), with `residual`
    giving r: exact arithmetic, for q over the vocabulary and q over a few candidate ids."""
    rng = np.random.RandomState(0)
    V = 12
    for _ in range(20):
        p = _distribution(rng, V, zeros=3)
        if clustered:
            ids = np.sort(rng.choice(V, 5, replace=False))
            q = _distribution(rng, 5)
            q_full = np.zeros(V, np.float32)
            q_full[ids] = q
            r = residual(mx.array(p[None]), mx.array(q[None]), mx.array(ids[None], dtype=mx.int32))
        else:
            q = q_full = _distribution(rng, V, zeros=2)
            r = residual(mx.array(p[None]), mx.array(q[None]), None)
        r = np.array(r[0])
        assert np.allclose(r, np.maximum(p - q_full, 0), atol=1e-7)
        keep = np.minimum(q_full, p)  # q(x) min(1, p(x)/q(x))
        emitted = keep + (1 - keep.sum()) * r / r.sum()
        assert np.allclose(emitted, p, atol=1e-6)


def test_draft_probability_and_zero_residual():
    q = mx.array([[0.25, 0.75], [0.5, 0.5]])
    ids = mx.array([[7, 3], [1, 2]], dtype=mx.int32)
    assert draft_probability(q, ids, mx.array([3, 1], dtype=mx.int32)).tolist() == [0.75, 0.5]
    assert draft_probability(mx.array([[0.1, 0.9]]), None, mx.array([1])).tolist() == [pytest.approx(0.9)]
    # p == q: a rejection has probability 0; should one happen, the residual is p, not 0/0.
    p = mx.array([[0.2, 0.8]])
    assert np.allclose(np.array(residual(p, p, None)), np.array(p))


def _drawn_positions(p, q, ids, drafts, seed, wrong_residual=False):
    """Run `judge` on N independent positions (same p and q, drafts given; one row drafting N
    tokens, each position its own random numbers): the token each would emit, drafts[i] if
    kept, else its residual draw."""
    N = drafts.shape[0]
    logp = mx.log(mx.broadcast_to(mx.array(p), (1, N + 1, p.shape[0])))
    seeds = mx.array([[seed, 0]], dtype=mx.uint32)
    batch = lambda a: None if a is None else a[None]
    kept, tokens = judge(logp, drafts[None], batch(q), batch(ids), seeds, mx.array([0]))
    if wrong_residual:  # the classic mistake: redraw a rejected position from p itself
        tokens = categorical(logp, seeds, mx.arange(N + 1)[None], 99)
    return np.array(mx.where(kept[0], drafts, tokens[0, :N]))


def _counts(tokens: np.ndarray) -> Counter:
    return Counter((int(t),) for t in tokens)


def _probs(p: np.ndarray) -> dict:
    return {(t,): float(p[t]) for t in range(len(p))}


N_SYNTHETIC = 200_000


def test_judge_draws_p_and_rejects_wrong_rules():
    rng = np.random.RandomState(1)
    V = 10
    p, q = _distribution(rng, V, zeros=2), _distribution(rng, V, zeros=1)
    key = 0
    drafts = mx.random.categorical(mx.log(mx.array(q)), shape=(N_SYNTHETIC,), key=mx.random.key(1))
    q_rows = mx.broadcast_to(mx.array(q), (N_SYNTHETIC, V))
    right = chi_square_pvalue(_counts(_drawn_positions(p, q_rows, None, drafts, key)), _probs(p))
    assert right > ALPHA, f"sampled drafts: p-value {right:.2e}"
    wrong = chi_square_pvalue(
        _counts(_drawn_positions(p, q_rows, None, drafts, key, wrong_residual=True)), _probs(p)
    )
    assert wrong < ALPHA, f"residual drawn from p: p-value {wrong:.2e}, not rejected"
    # Greedy drafts (argmax q) judged as if drawn from q: wrong.
    greedy_drafts = mx.full((N_SYNTHETIC,), int(np.argmax(q)), dtype=mx.int32)
    counts = _counts(_drawn_positions(p, q_rows, None, greedy_drafts, key))
    wrong = chi_square_pvalue(counts, _probs(p))
    assert wrong < ALPHA, f"greedy drafts judged with softmax q: p-value {wrong:.2e}, not rejected"
    print(f"\nsynthetic, greedy drafts judged with softmax q: chi-square {chi_square(counts, _probs(p))}")
    # ... but judged as what they are, a point mass (q None), they are right again.
    right = chi_square_pvalue(_counts(_drawn_positions(p, None, None, greedy_drafts, key)), _probs(p))
    assert right > ALPHA, f"deterministic drafts: p-value {right:.2e}"
    print(f"synthetic: point-mass drafts p-value {right:.3f}")


def test_judge_with_clustered_q():
    """q over a few candidate ids per position (different ids at each), some of them where p is 0."""
    rng = np.random.RandomState(2)
    V, C = 16, 5
    p = _distribution(rng, V, zeros=4)
    ids = np.stack([rng.choice(V, C, replace=False) for _ in range(N_SYNTHETIC)]).astype(np.int32)
    q = rng.dirichlet(np.ones(C), size=N_SYNTHETIC).astype(np.float32)
    picks = (rng.random_sample((N_SYNTHETIC, 1)) > np.cumsum(q, axis=1)).sum(axis=1)
    drafts = mx.array(ids[np.arange(N_SYNTHETIC), np.minimum(picks, C - 1)])
    tokens = _drawn_positions(p, mx.array(q), mx.array(ids), drafts, 3)
    value = chi_square_pvalue(_counts(tokens), _probs(p))
    assert value > ALPHA, f"clustered q: p-value {value:.2e}"


# ---------------------------------------------------------------------------------------------
# Whole generations of the fixtures


def exact_joint(target, sampling, prompt=PROMPT, depth=DEPTH) -> dict:
    """P(first `depth` tokens) under plain sampling, every continuation enumerated."""
    out = {}

    def walk(prefix, prob):
        if len(prefix) == depth:
            out[tuple(prefix)] = prob
            return
        ids = prompt + prefix
        hidden = prefill(target, ids, target.make_cache())
        history = mx.array(ids, dtype=mx.int32) if sampling.processors else None
        p = np.array(mx.exp(sampling.log_probs(sampling.process(target.logits(hidden)[0], history)))[0])
        for token in np.flatnonzero(p > 0):
            walk(prefix + [int(token)], prob * float(p[token]))

    walk([], 1.0)
    return out


def sample_joint(target, drafter, k, sampling, n: int, propose=None, prompt=PROMPT, depth=DEPTH):
    """Counts of the first `depth` tokens of n generations, one row at a time, each with its
    own seed; and the drafts accepted / drafted."""
    settings = [dataclasses.replace(sampling, seed=i) for i in range(n)]
    out = decode(target, drafter, [prompt] * n, k, depth, sampling=settings, max_batch=1, propose=propose)
    drafted = sum(o.usage.drafted for o in out)
    return Counter(tuple(o.tokens) for o in out), sum(o.usage.accepted for o in out) / max(drafted, 1)


def greedy_drafts_judged_as_sampled(drafter, target):
    """The wrong variant: argmax drafts, reported as drawn from q = the drafter's softmax."""

    def propose(rows: Rows, k: int) -> Draft:
        shared_kv = rows.cache.views(target.kv_producers, rows.hidden.dtype)
        position = rows.cache.positions.offset
        token, hidden, tokens, qs = rows.token, rows.hidden, [], []
        for _ in range(k):
            inputs = mx.concatenate([target.embed(token), hidden], axis=-1)
            h, hidden = drafter(inputs, shared_kv, position)
            logq = rows.settings[0].log_probs(drafter.logits(h)[:, 0])  # [B, V]
            token = mx.argmax(logq, axis=-1, keepdims=True).astype(mx.int32)
            tokens.append(token)
            qs.append(mx.exp(logq))
        return Draft(tokens=mx.concatenate(tokens, axis=1), q=mx.stack(qs, axis=1))

    return propose


# kind: (samples, k). k = 1 puts the bonus token among the first DEPTH tokens, k = 2 a second
# draft (and its residual).
RUNS = {"dense": (1500, 2), "e2b": (600, 1)}


@pytest.mark.parametrize("kind", ["dense", "e2b"])
def test_speculative_sampling_draws_the_target_distribution(kind, loaded):
    """Dense head (q over the vocabulary) and clustered head (q over candidates)."""
    target, drafter = loaded[kind]
    exact = exact_joint(target, SAMPLING)
    n, k = RUNS[kind]
    counts, acceptance = sample_joint(target, drafter, k, SAMPLING, n)
    value = chi_square_pvalue(counts, exact)
    print(
        f"\n{kind}: speculative sampling p-value {value:.3f}, acceptance {acceptance:.2f}, {len(exact)} outcomes"
    )
    assert acceptance > 0.3, "too few drafts accepted for the test to have power"
    assert value > ALPHA, f"speculative sampling differs from the target's distribution: p-value {value:.2e}"


def test_plain_sampling_draws_the_target_distribution(loaded):
    target, _ = loaded["dense"]
    counts, _ = sample_joint(target, None, 0, SAMPLING, 1000)
    value = chi_square_pvalue(counts, exact_joint(target, SAMPLING))
    print(f"\nplain sampling p-value {value:.3f}")
    assert value > ALPHA


def test_wrong_variant_is_rejected(loaded):
    """Greedy drafts judged with q = softmax(drafter logits) — what transformers' assisted
    sampling does with these drafters — is measurably not the target's distribution."""
    target, drafter = loaded["dense"]
    propose = greedy_drafts_judged_as_sampled(drafter, target)
    counts, acceptance = sample_joint(target, None, 2, SAMPLING, 300, propose=propose)
    exact = exact_joint(target, SAMPLING)
    value = chi_square_pvalue(counts, exact)
    stat, dof = chi_square(counts, exact)
    print(
        f"\nwrong variant: p-value {value:.1e} (chi-square {stat:.0f}, {dof} dof), acceptance {acceptance:.2f}"
    )
    assert value < ALPHA, f"the wrong variant was not rejected: p-value {value:.2e}"


def follow_the_last(tokens: mx.array, logits: mx.array) -> mx.array:
    """A logits processor whose effect hangs on the history's last token: it makes token
    (last * 7 + 3) mod V likely, so a verify row handed the wrong history samples wrongly."""
    boosted = (tokens[-1] * 7 + 3) % logits.shape[-1]
    return logits + 6.0 * (mx.arange(logits.shape[-1]) == boosted)


def test_processors_see_each_rows_history(loaded):
    """Logits processors (a repetition penalty, then the caller's), with the drafts in the
    history of the later verify rows: still exact."""
    target, drafter = loaded["dense"]
    sampling = make_sampling(
        temperature=1.5, top_k=4, repetition_penalty=3.0, repetition_context_size=4,
        logits_processors=[follow_the_last],
    )  # fmt: skip
    exact = exact_joint(target, sampling)
    counts, acceptance = sample_joint(target, drafter, 2, sampling, 600)
    value = chi_square_pvalue(counts, exact)
    print(f"\nlogits processors: p-value {value:.3f}, acceptance {acceptance:.2f}")
    assert value > ALPHA


# ---------------------------------------------------------------------------------------------
# Deterministic checks


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_1_sampling_is_greedy(kind, checkpoints):
    """With one token left, p is a point mass: sampled speculative output is the greedy output."""
    model, tokenizer = load(checkpoints[kind][0])
    drafter = load_drafter(checkpoints[kind][1], model)
    greedy = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=40)]
    for k in (1, 4):
        out = list(stream_generate(
            model, tokenizer, PROMPT, 40, draft_model=drafter, num_draft_tokens=k, temperature=0.8, top_k=1, seed=3
        ))  # fmt: skip
        assert [r.token for r in out] == greedy
        assert out[-1].accepted > 0


def test_seeded_runs_reproduce(checkpoints):
    model, tokenizer = load(checkpoints["e2b"][0])
    drafter = load_drafter(checkpoints["e2b"][1], model)

    def run(seed, k=3):
        kwargs = dict(temperature=1.0, top_p=0.9, min_p=0.05, seed=seed)
        return [
            r.token
            for r in stream_generate(
                model, tokenizer, PROMPT, 30, draft_model=drafter, num_draft_tokens=k, **kwargs
            )
        ]

    assert run(5) == run(5)
    assert run(5) != run(6)
    mx.random.seed(11)
    unseeded = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=30, temperature=1.0)]
    mx.random.seed(11)  # seed=None draws its key from MLX's global generator
    again = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=30, temperature=1.0)]
    assert again == unseeded


def test_greedy_with_processors_is_exact(loaded):
    """Greedy with a repetition penalty: speculative output is plain output, and plain output
    is mlx-lm's own generate_step with the same processor on the same weights."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.gemma4_text import Model
    from mlx_lm.sample_utils import make_logits_processors

    target, drafter = loaded["dense"]
    sampling = make_sampling(repetition_penalty=1.5, repetition_context_size=6)
    prompt = mx.array([PROMPT], dtype=mx.int32)
    (plain,) = decode(target, None, [PROMPT], 0, 40, sampling=sampling)
    assert plain.tokens != decode(target, None, [PROMPT], 0, 40)[0].tokens, "no test"
    for k in (2, 5):
        assert decode(target, drafter, [PROMPT], k, 40, sampling=sampling)[0].tokens == plain.tokens
    slack = []  # a drafting round is read before the next is queued: the device has no slack
    decode(target, drafter, [PROMPT], 2, 8, sampling=sampling, on_step=lambda e, s, r: slack.append(e.slack))
    assert len(slack) > 2 and max(slack) == 0
    plain = plain.tokens
    model = Model(target.args)
    model.model = target.model
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=6)
    steps = generate_step(prompt[0], model, max_tokens=40, sampler=greedy, logits_processors=processors)
    assert [int(t) for t, _ in steps] == plain


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=5),
    dict(temperature=1.1, top_p=0.9, min_p=0.02, top_k=7),
])  # fmt: skip
def test_log_probs_are_what_mlx_lm_samples(params):
    """`Sampling.log_probs` is the distribution mlx-lm's make_sampler draws from."""
    params = dict(params)
    rng = np.random.RandomState(4)
    logits = mx.array(rng.normal(size=(1, 16)).astype(np.float32) * 2)
    p = np.array(mx.exp(make_sampling(**params).log_probs(logits)))[0]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.random.seed(0)
    top_p = params.pop("top_p", 0.0)
    sampler = make_sampler(temp=params.pop("temperature"), top_p=top_p, **params)
    drawn = sampler(mx.broadcast_to(logprobs, (50_000, 16)))
    value = chi_square_pvalue(_counts(np.array(drawn)), _probs(p))
    assert value > ALPHA, f"{params}: p-value {value:.2e}"


def test_bad_sampling_arguments():
    for bad in (
        dict(temperature=-1),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-2),
        dict(top_k=2.5),
        dict(repetition_penalty=0),
        dict(repetition_context_size=0),
        dict(logits_processors=[3]),
        dict(seed=-1),
        dict(seed=2**70),
        dict(seed=1.5),
        dict(seed="7"),
        dict(temperature=float("nan")),
    ):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            make_sampling(**bad)
