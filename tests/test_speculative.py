"""The speculative loop is exact: its greedy tokens are the target's plain greedy tokens.

Every architecture, draft lengths 1/3/7, prompts longer than three sliding windows, float32
and 4-bit; drafts really accepted (agreeing drafters, and scripted proposals that walk every
accepted length 0..k, the full accept with its bonus token, and a stop inside an accepted run);
rounds pipelined (queued before the one ahead is read back) and timed only where that is
what they cost.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp import engine as engine_module
from mlx_gemma_mtp import load, load_drafter, stream_generate
from mlx_gemma_mtp.drafter import compiled_step
from mlx_gemma_mtp.engine import PromptCache
from mlx_gemma_mtp.load import load_target
from mlx_gemma_mtp.quantize import quantize
from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.speculative import MAX_DRAFT, prefill
from tests.fixtures import KINDS, SLIDING_WINDOW
from tests.run import decode, prompts, scripted

PROMPT_LEN = 3 * SLIDING_WINDOW + 5
NEW_TOKENS = 5 * SLIDING_WINDOW  # generation crosses the window several times more
DRAFT_LENGTHS = (1, 3, 7)


def _prompt(seed: int = 0) -> list[int]:
    return prompts(seed, [PROMPT_LEN])[0]


def _plain(target, prompt, n=NEW_TOKENS) -> list[int]:
    return decode(target, None, [prompt], 0, n)[0].tokens


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
        (out,) = decode(target, drafter, [prompt], k, NEW_TOKENS)
        assert out.tokens == plain, f"k={k}: speculative output differs from plain greedy"
        u = out.usage
        print(f"\n{kind} k={k}: acceptance {u.accepted / u.drafted:.2f} ({u.accepted}/{u.drafted})")
        assert u.accepted > 0, "the agreeing drafter never had a draft accepted"
        hf_drafter.generation_config.num_assistant_tokens = k
        with torch.no_grad():
            ref = hf_target.generate(
                torch.tensor([prompt]), assistant_model=hf_drafter, do_sample=False, max_new_tokens=NEW_TOKENS
            )[0, PROMPT_LEN:].tolist()
        # transformers stops at a stop id; up to there the tokens agree.
        assert out.tokens[: len(ref)] == ref, f"k={k}: differs from transformers' assisted generate"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", DRAFT_LENGTHS)
def test_every_accept_length(kind, k, pairs):
    target, _ = pairs[kind]
    prompt = _prompt(1)
    continuation = _plain(target, prompt, NEW_TOKENS + MAX_DRAFT)
    propose = scripted([continuation], [PROMPT_LEN], range(k + 1))
    (out,) = decode(target, None, [prompt], k, NEW_TOKENS, propose=propose)
    assert out.tokens == continuation[:NEW_TOKENS]
    histogram = np.bincount(out.kept_per_round[:-1], minlength=k + 1)  # the last round may be cut
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
        (out,) = decode(target, drafter, [prompt], k, NEW_TOKENS)
        assert out.tokens == plain
        print(f"\n{kind} 4-bit k={k}: acceptance {out.usage.accepted / out.usage.drafted:.2f}")


def test_stop_inside_accepted_run(checkpoints):
    """A stop id proposed by the drafter and accepted mid-run ends the output right there."""
    target, tokenizer = load(checkpoints["dense"][0])
    drafter = load_drafter(checkpoints["dense"][1], target)
    prompt = _prompt(3)
    kwargs = dict(max_tokens=NEW_TOKENS, draft_model=drafter, num_draft_tokens=7)
    responses = list(stream_generate(target, tokenizer, prompt, **kwargs))
    tokens = [r.token for r in responses]
    # A token accepted from a draft and followed by another accepted draft: mid-run.
    mid_run = [
        i for i in range(len(tokens) - 1)
        if responses[i].from_draft and responses[i + 1].from_draft and tokens.index(tokens[i]) == i
    ]  # fmt: skip
    assert mid_run, "the agreeing drafter produced no accepted run of two"
    stop_at = mid_run[0]
    tokenizer.eos_token_ids = {tokens[stop_at]}
    stopped = list(stream_generate(target, tokenizer, prompt, **kwargs))
    assert [r.token for r in stopped] == tokens[: stop_at + 1]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].text == ""


@pytest.mark.parametrize("kind", KINDS)
def test_early_stop_leaves_the_cache_ready_to_continue(kind, pairs, checkpoints):
    """Stop after j tokens (mid-round), then continue the same conversation cache: the same
    tokens as a fresh run, and only the new token is prefilled."""
    target, drafter = pairs[kind]
    _, tokenizer = load(checkpoints[kind][0])
    prompt = _prompt(4)
    fresh = _plain(target, prompt)
    for j, k in ((1, 7), (6, 7), (13, 3), (9, 0)):
        cache = PromptCache()
        head = []
        for r in stream_generate(
            target, tokenizer, prompt, NEW_TOKENS, draft_model=drafter, num_draft_tokens=k, prompt_cache=cache
        ):
            head.append(r.token)
            if len(head) == j:
                break
        assert cache.tokens == prompt + head[:-1] and cache.cache.positions.low == [PROMPT_LEN + j - 1]
        rest = list(stream_generate(
            target, tokenizer, prompt + head, NEW_TOKENS - j, draft_model=drafter, num_draft_tokens=3, prompt_cache=cache
        ))  # fmt: skip
        assert head + [r.token for r in rest] == fresh
        assert rest[0].prompt_tokens == 1  # the last token of the head: the cache held the rest


def test_random_drafter_is_still_exact(random_checkpoints):
    """A drafter that agrees with nothing walks the all-rejected path: still exact."""
    target = load_target(random_checkpoints["e2b"][0])
    drafter = load_drafter(random_checkpoints["e2b"][1], target)
    prompt = _prompt(5)
    (out,) = decode(target, drafter, [prompt], 3, NEW_TOKENS)
    assert out.tokens == _plain(target, prompt) and out.usage.accepted < out.usage.drafted


@pytest.mark.parametrize("kind", KINDS)
def test_long_context_past_the_ring(kind, pairs):
    """Hundreds of positions: the sliding rings wrap many times over and every rewind stays
    exact (the fixture's window is tiny, its ring holds window + a prefill chunk and more)."""
    target, drafter = pairs[kind]
    prompt = prompts(6, [300])[0]
    (out,) = decode(target, drafter, [prompt], 7, 350)
    assert out.tokens == _plain(target, prompt, 350)
    assert out.usage.accepted > 0


# ---------------------------------------------------------------------------------------------
# The pipeline


class _Watching:
    """A policy playing `moves` forever that notes, at each choice, how many rounds the
    engine had read back, and which rounds it was told the time of."""

    def __init__(self, moves, engine_reads: list):
        self.moves, self.reads, self.read_back, self.timed = itertools.cycle(moves), engine_reads, [], []

    def choose(self, limit, rows=()):
        self.read_back.append(len(self.reads))
        return min(next(self.moves), limit)

    def observe(self, k, accepted):
        """Watching only."""

    def observe_time(self, k, batch, seconds, own=None):
        self.timed.append(k)

    def forget(self, row):
        """Watching only."""

    def shadow(self):
        return False


@pytest.fixture
def reads(monkeypatch):
    """Every round the engine reads back, in order (its k)."""
    seen = []
    read = engine_module.Queued.read

    def recording(self):
        seen.append(self.k)
        return read(self)

    monkeypatch.setattr(engine_module.Queued, "read", recording)
    return seen


def test_rounds_are_queued_before_the_round_ahead_is_read_back(pairs, reads):
    """Choice c is made with rounds 0..c-2 read back: round c-1 still runs. With logits
    processors a drafting round is read back before the next is queued (the history must be
    on the host), while plain steps stay pipelined; the output is the same either way."""
    target, drafter = pairs["dense"]
    prompt, n = _prompt(4), 48
    moves = [0] * 6 + [2] + [0] * 4 + [1]
    for sampling in (make_sampling(), make_sampling(repetition_penalty=1.0)):
        reads.clear()
        policy = _Watching(moves, reads)
        (out,) = decode(target, drafter, [prompt], policy, n, sampling=sampling)
        assert out.tokens == _plain(target, prompt, n)
        behind = [c - seen for c, seen in enumerate(policy.read_back)]
        for c in range(1, len(moves) * 3):
            after_drafting = moves[(c - 1) % len(moves)] > 0
            assert behind[c] == (0 if sampling.processors and after_drafting else 1), (c, behind)


def test_only_rounds_in_a_full_pipeline_are_timed(pairs, reads):
    """A round queued into an empty pipeline waits for its own graph to be built and launched:
    only rounds queued behind one and read back with one behind them are timed (seen on MLX
    CUDA: untimed so, a plain step took 2x a pipelined one)."""
    target, drafter = pairs["dense"]
    policy = _Watching([2] + [0] * 100, reads)
    (out,) = decode(target, drafter, [_prompt(6)], policy, 30)
    plain_steps = out.usage.draft_lengths[0]
    assert out.usage.draft_lengths[2] == 1 and plain_steps > 20
    # Not timed: the drafting round (queued into an empty pipeline, behind the prefill) and the
    # last plain step (read back with nothing behind it).
    assert policy.timed == [0] * (plain_steps - 1)


class _Shadowing(_Watching):
    """Plain steps only, each with a shadow; the verdicts it is told, in order."""

    def __init__(self):
        super().__init__([0], [])
        self.verdicts = []

    def observe(self, k, accepted):
        self.verdicts.append((k, dict(accepted)))

    def shadow(self):
        return True


def test_a_shadow_judges_one_draft_beside_a_plain_step_and_changes_nothing(pairs):
    """A shadow's draft is judged as a round of one would judge it (scripted drafts: wrong,
    right, wrong, ...), comes to `observe` as a round of k = 1 and is never emitted, counted as
    drafted or timed (the engine counts them apart); greedy and sampled rows emit what plain
    decoding does."""
    target, drafter = pairs["dense"]
    prompt, n = _prompt(7), 24
    continuation = _plain(target, prompt, n + MAX_DRAFT)
    policy = _Shadowing()
    propose = scripted([continuation], [PROMPT_LEN], [0, 1])
    engines = []
    (out,) = decode(
        target, None, [prompt], policy, n, propose=propose, on_step=lambda e, *_: engines.append(e)
    )
    assert out.tokens == continuation[:n]
    assert out.usage.drafted == 0 and out.usage.rounds == 0
    assert engines[-1].shadows == len(policy.verdicts)
    assert policy.timed == []
    assert all(k == 1 and list(a) == [0] for k, a in policy.verdicts) and len(policy.verdicts) >= n - 2
    assert [a[0] for _, a in policy.verdicts] == [i % 2 for i in range(len(policy.verdicts))]
    sampled = make_sampling(temperature=1.0, seed=3)
    (alone,) = decode(target, drafter, [prompt], 0, n, sampling=sampled)
    (shadowed,) = decode(target, drafter, [prompt], _Shadowing(), n, sampling=sampled)
    assert shadowed.tokens == alone.tokens


@pytest.mark.parametrize("kind", KINDS)
def test_an_agreeing_drafters_shadows_are_kept_as_its_rounds_are(kind, pairs):
    """Sampled rows: a shadow's verdict is `judge`'s (e2b: on the clustered head's q). An agreeing
    drafter's shadows are kept about as often as its drafts in rounds of one, and the sampled
    output is plain decoding's."""
    target, drafter = pairs[kind]
    prompt, n = _prompt(8), 48
    sampled = make_sampling(temperature=1.0, seed=5)
    policy = _Shadowing()
    (shadowed,) = decode(target, drafter, [prompt], policy, n, sampling=sampled)
    (alone,) = decode(target, drafter, [prompt], 0, n, sampling=sampled)
    assert shadowed.tokens == alone.tokens
    shadow_rate = np.mean([a[0] for _, a in policy.verdicts])
    (rounds,) = decode(target, drafter, [prompt], 1, n, sampling=sampled)
    assert rounds.usage.acceptance_rate > 0.5
    print(f"\n{kind}: shadows kept {shadow_rate:.2f}, rounds of one {rounds.usage.acceptance_rate:.2f}")
    assert abs(shadow_rate - rounds.usage.acceptance_rate) < 0.25, (shadow_rate, rounds.usage)


@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_drafter_step_is_the_drafter_step_traced_once_per_view_shape(kind, pairs):
    """The step the proposer runs is compiled: it must compute what the drafter computes, and
    decoding must not trace it again every round (only when a full buffer grows)."""
    target, drafter = pairs[kind]
    traces = []

    def embed(token):  # runs only while the compiled step is traced
        traces.append(1)
        return target.embed(token)

    step = compiled_step(drafter, embed, drafter.greedy_token)
    cache = target.make_cache()
    hidden = prefill(target, _prompt(), cache)
    token = mx.array([[7]], dtype=mx.int32)
    shapes = set()
    for i in range(2 * SLIDING_WINDOW):
        shared_kv = cache.views(target.kv_producers, hidden.dtype)
        shapes.add(tuple(keys.shape for keys, _, _ in shared_kv.values()))
        position = cache.positions.offset
        drafted, projected = step(token, hidden, position, shared_kv)
        h, expected = drafter(mx.concatenate([target.embed(token), hidden], axis=-1), shared_kv, position)
        assert drafted.tolist() == drafter.greedy_token(h).tolist()
        assert mx.allclose(projected, expected, atol=1e-5).item(), i
        hidden = target(token, cache)  # one plain position on, past the window
        token = drafted
    assert len(traces) == len(shapes) == 1
