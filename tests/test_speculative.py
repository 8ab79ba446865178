"""The speculative loop is exact: its greedy tokens are the target's plain greedy tokens.

Every architecture, draft lengths 1/3/7, prompts longer than three sliding windows, float32
and 4-bit; drafts really accepted (agreeing drafters, and scripted proposals that walk every
accepted length 0..k, the full accept with its bonus token, and a stop inside an accepted run).
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp import load, load_drafter, stream_generate
from mlx_gemma_mtp.draft_length import Auto, Costs
from mlx_gemma_mtp.drafter import compiled_step
from mlx_gemma_mtp.load import load_target
from mlx_gemma_mtp.quantize import quantize
from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.speculative import (
    MAX_DRAFT,
    Draft,
    DraftStats,
    drafter_proposer,
    plain_tokens,
    prefill,
    speculative_tokens,
)
from tests.fixtures import KINDS, SLIDING_WINDOW, VOCAB_SIZE

PROMPT_LEN = 3 * SLIDING_WINDOW + 5
NEW_TOKENS = 5 * SLIDING_WINDOW  # generation crosses the window several times more
DRAFT_LENGTHS = (1, 3, 7)


def _prompt(seed: int = 0) -> mx.array:
    return mx.array(np.random.RandomState(seed).randint(4, VOCAB_SIZE, size=(1, PROMPT_LEN)), dtype=mx.int32)


def _take(tokens, n: int) -> list[int]:
    out = [t for t, _ in itertools.islice(tokens, n)]
    tokens.close()
    return out


def _plain(target, prompt, n=NEW_TOKENS) -> list[int]:
    return _take(plain_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1)), n)


def _speculative(target, prompt, propose, k, n=NEW_TOKENS, stats=None) -> list[int]:
    stats = DraftStats() if stats is None else stats
    cache = target.make_cache(MAX_DRAFT + 1)
    return _take(speculative_tokens(target, prompt, cache, propose, k, n, stats), n)


@pytest.fixture(scope="module")
def pairs(loaded):
    return loaded


@pytest.mark.parametrize("kind", KINDS)
def test_speculative_equals_plain_equals_transformers(kind, pairs, hf_models):
    import torch

    target, drafter = pairs[kind]
    prompt = _prompt()
    plain = _plain(target, prompt)
    hf_target, hf_drafter = hf_models[kind]
    for k in DRAFT_LENGTHS:
        stats = DraftStats()
        spec = _speculative(target, prompt, drafter_proposer(drafter, target), k, stats=stats)
        assert spec == plain, f"k={k}: speculative output differs from plain greedy"
        rate = stats.accepted / stats.drafted
        print(f"\n{kind} k={k}: acceptance {rate:.2f} ({stats.accepted}/{stats.drafted}), "
              f"mean accepted per round {stats.accepted / stats.rounds:.2f}")
        assert stats.accepted > 0, "the agreeing drafter never had a draft accepted"

        hf_drafter.generation_config.num_assistant_tokens = k
        with torch.no_grad():
            ref = hf_target.generate(
                torch.tensor(np.array(prompt)), assistant_model=hf_drafter, do_sample=False,
                max_new_tokens=NEW_TOKENS,
            )[0, PROMPT_LEN:].tolist()
        # transformers stops at a stop id; up to there the tokens agree.
        assert spec[: len(ref)] == ref, f"k={k}: differs from transformers' assisted generate"


def _scripted(continuation: list[int], accept_lengths):
    """Proposals that are the known continuation with exactly one miss per round, at the
    index given by the next accept length (k means no miss: a full accept plus bonus)."""
    lengths = itertools.cycle(accept_lengths)

    def propose(request, cache):
        take = min(next(lengths), request.k)
        g = request.generated
        drafts = continuation[g : g + request.k]
        if take < request.k:
            drafts[take] = (drafts[take] + 1) % VOCAB_SIZE  # a wrong token
        return Draft(tokens=mx.array([drafts], dtype=mx.int32))

    return propose


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", DRAFT_LENGTHS)
def test_every_accept_length(kind, k, pairs):
    target, _ = pairs[kind]
    prompt = _prompt(1)
    continuation = _plain(target, prompt, NEW_TOKENS + MAX_DRAFT)
    stats = DraftStats()
    spec = _speculative(target, prompt, _scripted(continuation, range(k + 1)), k, stats=stats)
    assert spec == continuation[:NEW_TOKENS]
    histogram = np.bincount(stats.accepted_per_round, minlength=k + 1)
    assert (histogram > 0).all(), f"accepted lengths {histogram} miss some of 0..{k}"


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_speculative_equals_plain(kind, checkpoints):
    target, _ = load(checkpoints[kind][0])
    drafter = load_drafter(checkpoints[kind][1], target)
    quantize(target, bits=4, group_size=32)
    quantize(drafter, bits=4, group_size=32)
    prompt = _prompt(2)
    plain = _plain(target, prompt)
    for k in DRAFT_LENGTHS:
        stats = DraftStats()
        assert _speculative(target, prompt, drafter_proposer(drafter, target), k, stats=stats) == plain
        print(f"\n{kind} 4-bit k={k}: acceptance {stats.accepted / stats.drafted:.2f}")


def test_stop_inside_accepted_run(checkpoints):
    """A stop id proposed by the drafter and accepted mid-run ends the output right there."""
    target, tokenizer = load(checkpoints["dense"][0])
    drafter = load_drafter(checkpoints["dense"][1], target)
    prompt = np.array(_prompt(3))[0].tolist()
    responses = list(stream_generate(target, tokenizer, prompt, drafter, max_tokens=NEW_TOKENS, num_draft_tokens=7))
    tokens = [r.token for r in responses]
    # A token accepted from a draft and followed by another accepted draft: mid-run.
    mid_run = [
        i for i in range(len(tokens) - 1)
        if responses[i].from_draft and responses[i + 1].from_draft and tokens.index(tokens[i]) == i
    ]
    assert mid_run, "the agreeing drafter produced no accepted run of two"
    stop_at = mid_run[0]
    tokenizer.eos_token_ids = {tokens[stop_at]}
    stopped = list(stream_generate(target, tokenizer, prompt, drafter, max_tokens=NEW_TOKENS, num_draft_tokens=7))
    assert [r.token for r in stopped] == tokens[: stop_at + 1]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].text == ""


@pytest.mark.parametrize("kind", KINDS)
def test_early_stop_leaves_cache_ready_to_continue(kind, pairs):
    """Stop after j tokens (mid-round), then continue on the same cache: same tokens as fresh."""
    target, drafter = pairs[kind]
    prompt = _prompt(4)
    fresh = _plain(target, prompt)
    for j in (1, 6, 13):
        cache = target.make_cache(MAX_DRAFT + 1)
        tokens = speculative_tokens(target, prompt, cache, drafter_proposer(drafter, target), 7, NEW_TOKENS, DraftStats())
        head = _take(tokens, j)
        assert all(c.offset == PROMPT_LEN + j - 1 for c in cache)
        rest = speculative_tokens(
            target, mx.array([[head[-1]]]), cache, drafter_proposer(drafter, target), 3, NEW_TOKENS, DraftStats()
        )
        assert head + _take(rest, NEW_TOKENS - j) == fresh
        assert all(c.offset == PROMPT_LEN + NEW_TOKENS - 1 for c in cache)

        cache = target.make_cache(MAX_DRAFT + 1)
        head = _take(plain_tokens(target, prompt, cache), j)
        assert all(c.offset == PROMPT_LEN + j - 1 for c in cache)
        assert head + _take(plain_tokens(target, mx.array([[head[-1]]]), cache), NEW_TOKENS - j) == fresh
        assert all(c.offset == PROMPT_LEN + NEW_TOKENS - 1 for c in cache)


def test_random_drafter_is_still_exact(random_checkpoints):
    """A drafter that agrees with nothing walks the all-rejected path: still exact."""
    target = load_target(random_checkpoints["e2b"][0])
    drafter = load_drafter(random_checkpoints["e2b"][1], target)
    prompt = _prompt(5)
    stats = DraftStats()
    assert _speculative(target, prompt, drafter_proposer(drafter, target), 3, stats=stats) == _plain(target, prompt)


@pytest.mark.parametrize("kind", KINDS)
def test_long_context_through_cache_compaction(kind, pairs):
    """Hundreds of positions: sliding caches compact their buffers (start > 0) and every
    rewind stays exact; then stop mid-run and continue on the same cache."""
    target, drafter = pairs[kind]
    prompt = mx.array(np.random.RandomState(6).randint(4, VOCAB_SIZE, size=(1, 300)), dtype=mx.int32)
    plain = _plain(target, prompt, 300)
    cache = target.make_cache(MAX_DRAFT + 1)
    stats = DraftStats()
    head = _take(speculative_tokens(target, prompt, cache, drafter_proposer(drafter, target), 7, 300, stats), 150)
    rest = speculative_tokens(target, mx.array([[head[-1]]]), cache, drafter_proposer(drafter, target), 5, 300, DraftStats())
    assert head + _take(rest, 150) == plain
    # The buffers filled up (prompt, then a round at a time) and moved their tails to the front.
    assert max(c.start for c in cache if hasattr(c, "start")) > 0
    assert stats.accepted > 0


def test_rounds_are_queued_before_the_previous_is_read_back(pairs):
    """The host builds round r+1 while the device runs round r: proposals then see a device
    position. With logits processors (the history must be on the host) every round is read
    back first, and the output is the same either way."""
    target, drafter = pairs["dense"]
    propose = drafter_proposer(drafter, target)
    prompt, n = _prompt(3), 40
    for sampling, pipelined in ((make_sampling(), True), (make_sampling(repetition_penalty=1.0), False)):
        device_positions = []

        def recording(request, cache):
            device_positions.append(isinstance(request.position, mx.array))
            return propose(request, cache)

        cache = target.make_cache(MAX_DRAFT + 1)
        out = _take(speculative_tokens(target, prompt, cache, recording, 3, n, DraftStats(), sampling=sampling), n)
        assert out == _plain(target, prompt, n)
        if pipelined:
            # The first round starts from the prefill; the last ones drain near max_tokens.
            assert not device_positions[0] and sum(device_positions) >= len(device_positions) - 3
        else:
            assert not any(device_positions)


class _Watching:
    """A policy playing `moves` forever that notes, at each choice, how many rounds the loop
    had read back (`stats` counts a round when it is read back)."""

    def __init__(self, moves, stats: DraftStats):
        self.moves, self.stats, self.read_back, self.timed = itertools.cycle(moves), stats, [], []

    def choose(self, limit):
        self.read_back.append(sum(self.stats.k_histogram))
        return min(next(self.moves), limit)

    def observe(self, k, accepted):
        """Watching only."""

    def observe_time(self, k, seconds):
        self.timed.append(k)


def test_plain_steps_and_probes_between_them_stay_pipelined(pairs):
    """A plain step (k = 0) is a round like any other: the next one is chosen and queued while
    it runs, a probe round between plain steps drains nothing, and with logits processors
    plain steps stay pipelined too (their token joins the history on the device) while a
    drafting round is read back before the next is queued."""
    target, drafter = pairs["dense"]
    propose = drafter_proposer(drafter, target)
    prompt, n = _prompt(4), 48
    moves = [0] * 6 + [2] + [0] * 4 + [1]
    for sampling in (make_sampling(), make_sampling(repetition_penalty=1.0)):
        stats = DraftStats()
        policy = _Watching(moves, stats)
        cache = target.make_cache(MAX_DRAFT + 1)
        assert _take(speculative_tokens(target, prompt, cache, propose, policy, n, stats, sampling=sampling), n) == (
            _plain(target, prompt, n)
        )
        assert stats.k_histogram[1] and stats.k_histogram[2] and stats.rounds
        # Choice c (0-based) is made with rounds 0..c-2 read back: round c-1 still runs, ...
        behind = [c - seen for c, seen in enumerate(policy.read_back)]
        after_drafting = [c for c in range(1, len(moves) * 3) if moves[(c - 1) % len(moves)]]
        for c in range(1, len(moves) * 3):
            expected = 0 if sampling.processors and c in after_drafting else 1  # ... except here
            assert behind[c] == expected, (c, behind)


class _WatchingAuto(_Watching):
    """Auto, noting at each choice how many rounds the loop had read back."""

    def __init__(self, auto: Auto, stats: DraftStats):
        super().__init__([0], stats)
        self.auto, self.chosen = auto, []

    def choose(self, limit):
        self.read_back.append(sum(self.stats.k_histogram))
        self.chosen.append(self.auto.choose(limit))
        return self.chosen[-1]

    def observe(self, k, accepted):
        self.auto.observe(k, accepted)


def test_the_first_round_is_queued_before_the_first_token_and_never_drained(pairs):
    """The first round runs while the caller takes the first token (as mlx-lm's generate_step
    queues its second forward), and auto's first drafting round is not read back before the
    next round is queued: a plain step goes behind it (seen on MLX CUDA, 31B: reading it back
    at once restarted the pipeline, +17 ms per generation)."""
    target, drafter = pairs["dense"]
    stats = DraftStats()
    drafting_pays = Costs(plain=1.0, verify=tuple(1.03 + 0.02 * k for k in range(MAX_DRAFT + 1)), draft=0.1)
    policy = _WatchingAuto(Auto(drafting_pays), stats)
    prompt, n = _prompt(7), 40
    tokens = speculative_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1), drafter_proposer(drafter, target), policy, n, stats)
    first = next(tokens)[0]
    assert len(policy.chosen) == 1 and policy.chosen[0] > 0  # queued before the first token came
    assert [first] + _take(tokens, n - 1) == _plain(target, prompt, n)
    assert policy.chosen[1] == 0 and policy.read_back[:3] == [0, 0, 1]  # behind round 0, unread
    assert stats.accepted > 0


def test_a_plain_step_behind_a_drafting_round_is_not_timed_as_plain(pairs):
    """It reads a masked cache at a device position: its time is not what a plain token costs,
    and a policy told so would think plain decoding dearer than it is."""
    target, drafter = pairs["dense"]
    stats = DraftStats()
    policy = _Watching([2, 0, 0, 0], stats)
    n = 41
    tokens = speculative_tokens(
        target, _prompt(5), target.make_cache(MAX_DRAFT + 1), drafter_proposer(drafter, target), policy, n, stats
    )
    _take(tokens, n)
    plain_steps, drafting_rounds = stats.k_histogram[0], stats.rounds
    assert plain_steps >= 2 * drafting_rounds > 0
    # Every drafting round but the first (queued into an empty pipeline) is timed; of the
    # plain steps, all but the one right after each drafting round.
    assert policy.timed.count(2) >= drafting_rounds - 2
    assert policy.timed.count(0) <= plain_steps - drafting_rounds + 1
    assert policy.timed.count(0) >= plain_steps - drafting_rounds - 2


def test_only_rounds_in_a_full_pipeline_are_timed(pairs):
    """A round queued into an empty pipeline waits for its own graph to be built and launched
    (seen on MLX CUDA: such a plain step took 2x a pipelined one, and auto, told so, drafted
    with a useless drafter): only rounds queued behind one and read back with one behind them
    are timed."""
    target, drafter = pairs["dense"]
    stats = DraftStats()
    policy = _Watching([2] + [0] * 100, stats)
    n = 30
    tokens = speculative_tokens(
        target, _prompt(6), target.make_cache(MAX_DRAFT + 1), drafter_proposer(drafter, target), policy, n, stats
    )
    _take(tokens, n)
    assert stats.k_histogram[2] == 1 and stats.k_histogram[0] > 20
    # Not timed: the drafting round (queued into an empty pipeline), the plain step behind
    # it (a masked cache at a device position), and the last, drained with nothing behind it.
    assert policy.timed == [0] * (stats.k_histogram[0] - 2)


@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_drafter_step_is_the_drafter_step_traced_once_per_view_shape(kind, pairs):
    """The step the proposer runs is compiled: it must compute what the drafter computes, and
    decoding must not trace it again every round (only when a cache buffer grows or compacts)."""
    target, drafter = pairs[kind]
    traces = []

    def embed(token):  # runs only while the compiled step is traced
        traces.append(1)
        return target.embed(token)

    step = compiled_step(drafter, embed, drafter.greedy_token)
    cache = target.make_cache(MAX_DRAFT + 1)
    hidden = prefill(target, _prompt(), cache)
    token = mx.array([[7]], dtype=mx.int32)
    shapes = set()
    for i in range(2 * SLIDING_WINDOW):
        shared_kv = {kind: cache[layer].view() for kind, layer in target.kv_producers.items()}
        shapes.add(tuple(keys.shape for keys, _, _ in shared_kv.values()))
        position = cache[0].offset
        drafted, projected = step(token, hidden, mx.array(position, mx.int32), shared_kv)
        h, expected = drafter(mx.concatenate([target.embed(token), hidden], axis=-1), shared_kv, position)
        assert drafted.tolist() == drafter.greedy_token(h).tolist()
        assert mx.allclose(projected, expected, atol=1e-5).item(), i
        hidden = target(token, cache)  # one plain position on, past the window
        token = drafted
    assert len(traces) == len(shapes) < 4
