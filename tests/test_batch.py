"""Batched speculative decoding: every row is exactly what its prompt gives alone.

Rows of different lengths, stop points and draft acceptance; rows joining and leaving while
others decode; per-row sampling settings and seeds; logprobs with speculation on; bad input
refused before anything runs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mlx_gemma_mtp import batch_generate, load, stream_batch_generate
from mlx_gemma_mtp.draft_length import Auto
from mlx_gemma_mtp.engine import Engine, PromptCache, Request
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.sample import GREEDY, make_sampling
from tests.fixtures import KINDS, SLIDING_WINDOW, VOCAB_SIZE
from tests.run import decode, prompts
from tests.test_sampling import (
    DEPTH,
    PROMPT,
    SAMPLING,
    chi_square_pvalue,
    exact_joint,
    greedy_drafts_judged_as_sampled,
)

LENGTHS = [3 * SLIDING_WINDOW + 5, 6, 40, 17]  # ragged prompts
MAX_TOKENS = [40, 25, 33, 12]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_their_single_runs(kind, loaded):
    """Greedy rows of different lengths, stop points and acceptance equal each prompt decoded
    alone, for fixed k and auto (which, timed on a CPU, may find drafting does not pay at this
    batch: its rounds are the fixed k's, which must accept drafts)."""
    target, drafter = loaded[kind]
    batch = prompts(10, LENGTHS)
    alone = [decode(target, None, [p], 0, n)[0].tokens for p, n in zip(batch, MAX_TOKENS)]
    # Stop ids that end two of the rows early, at different points.
    stops = frozenset({alone[1][7], alone[2][20]}) - set(alone[0]) - set(alone[3])
    alone = [_cut(tokens, stops) for tokens in alone]
    for k in (1, 3, 7, draft_length("auto", target, drafter)):
        out = decode(target, drafter, batch, k, MAX_TOKENS, stop_ids=stops)
        assert [o.tokens for o in out] == alone, f"k={k}"
        assert isinstance(k, Auto) or sum(o.usage.accepted for o in out) > 0
        assert [o.finish_reason for o in out] == ["stop" if t[-1] in stops else "length" for t in alone]


def _cut(tokens: list[int], stops) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def test_rows_joining_and_cancelled_mid_generation_leave_the_others_exact(loaded):
    target, drafter = loaded["e2b"]
    batch = prompts(11, [20, 9, 300, 14])  # the third needs two prefill chunks
    alone = [decode(target, None, [p], 0, 30)[0].tokens for p in batch]
    late = {}

    def on_step(engine, step, rids):
        if step == 0:
            assert engine.free_rows == 1  # of 4: three wait to join
        if step == 4:
            assert engine.slack > 0  # the last step waited for a round, another is queued behind it
            late["join"] = engine.add(Request(prompt=batch[3], max_tokens=30))
            assert engine.free_rows == 0
        if step == 6:
            engine.cancel(rids[1])

    engine_out = decode(target, drafter, batch[:3], 3, 30, max_batch=4, on_step=on_step)
    assert [o.tokens for o in engine_out[:1] + engine_out[2:3]] == [alone[0], alone[2]]
    assert (
        engine_out[1].finish_reason == "cancelled"
        and alone[1][: len(engine_out[1].tokens)] == engine_out[1].tokens
    )
    assert engine_out[3].tokens == alone[3]  # the row that joined mid-generation


def test_seeded_rows_do_not_depend_on_their_neighbours(loaded):
    target, drafter = loaded["dense"]
    a, b, c = prompts(12, [15, 30, 7])
    s = make_sampling(temperature=1.0, top_p=0.95, seed=5)
    with_b = decode(
        target, drafter, [a, b], 3, [30, 200], sampling=[s, make_sampling(temperature=0.7, seed=9)]
    )
    with_c = decode(
        target, drafter, [a, c], 3, [30, 200], sampling=[s, make_sampling(temperature=1.2, seed=11)]
    )
    assert with_b[0].tokens == with_c[0].tokens
    assert with_b[1].tokens != with_c[1].tokens
    greedy_too = decode(target, drafter, [a, b], 3, [30, 30], sampling=[s, GREEDY])
    assert greedy_too[0].tokens == with_b[0].tokens  # a greedy neighbour: the same row still
    assert greedy_too[1].tokens == decode(target, None, [b], 0, 30)[0].tokens  # and it is exact


N_BATCHED = 900


def _batched_joint(target, drafter, n: int, propose=None) -> tuple[Counter, float]:
    settings = [make_sampling(temperature=1.5, top_k=4, seed=i) for i in range(n)]
    out = decode(target, drafter, [PROMPT] * n, 2, DEPTH, sampling=settings, max_batch=16, propose=propose)
    accepted = sum(o.usage.accepted for o in out) / sum(o.usage.drafted for o in out)
    return Counter(tuple(o.tokens) for o in out), accepted


def test_batched_sampling_draws_the_target_distribution(loaded):
    """Hundreds of sampled rows, each with its own seed, joining and leaving a batch of 16: the
    joint distribution of their first tokens is the target's. A planted bias fails the same
    test: greedy drafts judged as if drawn from the drafter's softmax (transformers' way)."""
    target, drafter = loaded["dense"]
    exact = exact_joint(target, SAMPLING)
    counts, accepted = _batched_joint(target, drafter, N_BATCHED)
    value = chi_square_pvalue(counts, exact)
    print(f"\nbatched sampling p-value {value:.3f}, acceptance {accepted:.2f}")
    assert accepted > 0.3, "too few drafts accepted for the test to have power"
    assert value > 1e-3

    biased, _ = _batched_joint(target, None, N_BATCHED // 3, greedy_drafts_judged_as_sampled(drafter, target))
    assert chi_square_pvalue(biased, exact) < 1e-3


def test_logprobs_with_speculation_are_plain_decodings(loaded):
    target, drafter = loaded["moe"]
    batch = prompts(13, [12, 31])
    plain = decode(target, None, batch, 0, 20, logprobs=3)
    spec = decode(target, drafter, batch, 3, 20, logprobs=3)
    for p, s in zip(plain, spec):
        assert s.tokens == p.tokens and sum(s.usage.accepted for s in [s]) > 0
        lp = [v for e in p.events for v in e.logprobs]
        ls = [v for e in s.events for v in e.logprobs]
        assert np.allclose(lp, ls, atol=1e-4)
        tops = [t for e in s.events for t in e.top_logprobs]
        assert [t[0][0] for t in tops] == s.tokens  # greedy: the chosen token is on top
        assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in tops)
        assert np.allclose([t[0][1] for t in tops], ls, atol=1e-6)


def test_prefix_cache_skips_what_a_finished_row_held(loaded):
    target, drafter = loaded["dense"]
    engine = Engine(target, drafter, num_draft_tokens=3, prefix_cache_size=2)
    first = prompts(14, [30])[0]
    rid = engine.add(Request(prompt=first, max_tokens=10, stop_ids=frozenset()))
    answer = [t for _ in iter(lambda: engine.busy, False) for e in engine.step() for t in e.tokens]
    follow = first + answer + [5, 6, 7]
    rid = engine.add(Request(prompt=follow, max_tokens=10, stop_ids=frozenset()))
    events = [e for _ in iter(lambda: engine.busy, False) for e in engine.step()]
    assert events[-1].usage.cached_tokens == len(first) + len(answer) - 1
    assert [t for e in events for t in e.tokens] == decode(target, None, [follow], 0, 10)[0].tokens
    assert rid == 1


def test_the_prefix_store_keeps_a_conversation_for_its_next_turn(loaded):
    """A request that shares only a conversation's first few ids (a chat template's header)
    starts fresh, and one that shares MIN_SHARED ids or more (a system prompt) starts from a
    copy: neither takes the kept cache from the conversation, whose next turn then prefills only
    what is new. Every answer is its prompt's alone."""
    from mlx_gemma_mtp.engine import MIN_SHARED

    target, drafter = loaded["dense"]
    engine = Engine(target, drafter, num_draft_tokens=3, prefix_cache_size=4)

    def run(prompt):
        engine.add(Request(prompt=prompt, max_tokens=8, stop_ids=frozenset()))
        events = [e for _ in iter(lambda: engine.busy, False) for e in engine.step()]
        tokens = [t for e in events for t in e.tokens]
        assert tokens == decode(target, None, [prompt], 0, 8)[0].tokens
        return tokens, events[-1].usage.cached_tokens

    first, other = prompts(19, [MIN_SHARED + 40, 60])
    answer, _ = run(first)
    assert run(first[:3] + other)[1] == 0  # a header's worth: not worth a copy
    assert run(first[: MIN_SHARED + 10] + other)[1] == MIN_SHARED + 10  # from a copy
    assert run(first[: MIN_SHARED - 1] + other)[1] == 0
    follow = first + answer + [5, 6, 7]
    assert run(follow)[1] == len(first) + len(answer) - 1  # the conversation's own cache, still kept


def test_a_kept_cache_holds_its_own_row_only(loaded):
    """Rows leaving a batch at different steps leave their caches in their prompt caches: each
    is that row's own copy, not a view holding the whole batch's buffers of its moment."""
    import gc

    import mlx.core as mx

    target, drafter = loaded["dense"]
    gc.collect()
    before = mx.get_active_memory()
    engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4)
    kept = [PromptCache() for _ in range(4)]
    for i, prompt in enumerate(prompts(15, [60] * 4)):
        engine.add(Request(prompt=prompt, max_tokens=5 + 9 * i, stop_ids=frozenset(), cache=kept[i]))
    while engine.busy:
        engine.step()
    del engine
    gc.collect()
    rows = sum(a.nbytes for c in kept for a in c.cache.state)
    assert mx.get_active_memory() - before <= 1.25 * rows, (mx.get_active_memory() - before, rows)


def test_a_prompt_cache_is_not_held_twice_while_its_row_decodes(loaded):
    """Turns continuing their prompt caches: the batch holds each row's cache, and the prompt
    caches give theirs up meanwhile (not a second copy of every row alive while decoding);
    each gets its row's back at the end. A turn asking one token leaves its prompt there."""
    import gc

    import mlx.core as mx

    target, drafter = loaded["dense"]
    first = prompts(15, [60] * 4)
    kept = [PromptCache() for _ in range(4)]
    engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4)
    for prompt, cache in zip(first, kept):
        engine.add(Request(prompt=prompt, max_tokens=5, stop_ids=frozenset(), cache=cache))
    answers = [[] for _ in first]
    while engine.busy:
        for event in engine.step():
            answers[event.rid] += event.tokens
    del engine
    gc.collect()
    before = mx.get_active_memory()
    rows = sum(a.nbytes for c in kept for a in c.cache.state)
    second = [p + a + [7, 9] for p, a in zip(first, answers)]
    engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4)
    for prompt, cache in zip(second, kept):
        engine.add(Request(prompt=prompt, max_tokens=8, stop_ids=frozenset(), cache=cache))
    held = 0
    while engine.busy:
        engine.step()
        gc.collect()
        held = max(held, mx.get_active_memory() - before)
    assert held <= 0.75 * rows, (held, rows)  # with both alive: one more set of rows
    assert [len(c.tokens) for c in kept] == [len(p) + 7 for p in second]
    third = kept[0].tokens + [11]
    engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4)
    engine.add(Request(prompt=third, max_tokens=1, stop_ids=frozenset(), cache=kept[0]))
    while engine.busy:
        engine.step()
    assert kept[0].tokens == third and kept[0].cache.positions.low == [len(third)]


def _run_tracing_slots(engine: Engine, on_event=None) -> tuple[dict, list[tuple[int, int]]]:
    """Step `engine` until idle: each row's tokens, and (slots, rows decoding) after each step.
    Each step's round read back ran the rows that decoded after the step before (held slots
    not counted: `Engine.last_round`)."""
    tokens, trace = {}, []
    while engine.busy:
        for event in engine.step():
            tokens.setdefault(event.rid, []).extend(event.tokens)
            if on_event is not None:
                on_event(event)
        k, rows = engine.last_round
        assert (k, rows) == (0, 0) or rows == trace[-1][1], (engine.last_round, trace)
        trace.append((engine.slots, engine.batch_size))
    return tokens, trace


def test_a_finished_rows_slot_is_held_until_a_request_takes_it(loaded):
    """A row that ends keeps its slot in the batch (the rounds keep their shape) and the next
    request takes it: the batch never runs a round at another size meanwhile, where without
    held slots (hold_steps=0) it runs one of three rows; every row exact either way."""
    target, drafter = loaded["e2b"]
    batch = prompts(16, [12, 20, 9, 15, 11])
    limits = [6, 40, 40, 40, 20]
    alone = [decode(target, None, [p], 0, n)[0].tokens for p, n in zip(batch, limits)]
    for hold in (8, 0):
        engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4, hold_steps=hold)
        rids = [
            engine.add(Request(prompt=p, max_tokens=n, stop_ids=frozenset()))
            for p, n in zip(batch, limits[:4])
        ]

        def on_event(event, engine=engine, rids=rids):
            if event.rid == rids[0] and event.finish_reason:  # the next request comes a step later
                rids.append(engine.add(Request(prompt=batch[4], max_tokens=limits[4], stop_ids=frozenset())))

        tokens, trace = _run_tracing_slots(engine, on_event)
        assert [tokens[r] for r in rids] == alone
        ended = next(i for i, (_, rows) in enumerate(trace) if rows == 3)  # the first row's end
        joined = next(i for i, (_, rows) in enumerate(trace) if i > ended and rows == 4)
        assert all(slots == 4 for slots, _ in trace[: joined + 1]) == bool(hold), trace
        assert any(slots == 4 and rows == 3 for slots, rows in trace) == bool(hold), trace


def test_held_slots_go_together_or_after_a_while(loaded):
    """Held slots go all at once when they are as many as the rows decoding (four rows, two
    ending close together: 4 -> 2, never 3), or after `HOLD_STEPS` steps with no request."""
    from mlx_gemma_mtp.engine import HOLD_STEPS

    target, drafter = loaded["e2b"]
    batch = prompts(17, [12, 20, 9, 15])
    for limits, sizes in (([6, 16, 60, 60], [4, 2]), ([6, 80, 80, 80], [4, 3])):
        alone = [decode(target, None, [p], 0, n)[0].tokens for p, n in zip(batch, limits)]
        engine = Engine(target, drafter, num_draft_tokens=3, max_batch=4)
        rids = [
            engine.add(Request(prompt=p, max_tokens=n, stop_ids=frozenset())) for p, n in zip(batch, limits)
        ]
        tokens, trace = _run_tracing_slots(engine)
        assert [tokens[r] for r in rids] == alone
        seen = [s for i, (s, _) in enumerate(trace) if s and (i == 0 or s != trace[i - 1][0])]
        assert seen[:2] == sizes, trace
        if sizes == [4, 3]:  # held its full while, then let go
            assert sum(slots == 4 and rows == 3 for slots, rows in trace) == HOLD_STEPS, trace


def test_rounds_are_not_timed_while_the_batch_settles_at_a_new_size(loaded):
    """The policy is told no round's time in the step that queues the first round at a new batch
    size nor in the next (their host time ran +40 / +20 ms on MLX CUDA), and is told again after."""
    from mlx_gemma_mtp.draft_length import Fixed

    class Timed(Fixed):
        def observe_time(self, k, batch, seconds, own=None):
            told.append(step)

    target, drafter = loaded["e2b"]
    engine = Engine(target, drafter, num_draft_tokens=Timed(2), max_batch=4, hold_steps=0)
    for prompt, n in zip(prompts(18, [12, 20, 9, 15]), [12, 40, 70, 70]):
        engine.add(Request(prompt=prompt, max_tokens=n, stop_ids=frozenset()))
    told, slots, step = [], [], 0
    while engine.busy:
        engine.step()
        slots.append(engine.slots)
        step += 1
    # The batch shrank in step s (its read-back): s + 1 queues the first round at the new size.
    resized = [s + 1 for s in range(1, len(slots)) if slots[s] != slots[s - 1] and slots[s]]
    assert len(resized) >= 2, slots
    for first in resized:
        assert first not in told and first + 1 not in told, (first, told, slots)
    assert any(s > resized[0] + 1 for s in told) and told[0] < resized[0]  # timed before and after


def test_a_round_is_timed_by_its_own_share_of_the_clock(loaded):
    """Where the host bounds the loop, the interval before a round's read-back is the host
    building the round queued after it: a drafting round whose build is slow is timed cheap and
    the plain step before it dear. `own` charges each round its own build."""
    import time

    from mlx_gemma_mtp.draft_length import Fixed
    from mlx_gemma_mtp.speculative import drafter_proposer

    class EveryFourth(Fixed):  # k = 2 every fourth round, plain otherwise; deaf to acceptance
        def __init__(self):
            super().__init__(2)
            self.rounds, self.told = 0, []

        def choose(self, limit, rows):
            self.rounds += 1
            return min(self.k if self.rounds % 4 == 0 else 0, limit)

        def observe_time(self, k, batch, seconds, own=None):
            self.told.append((k, seconds, own))

    target, drafter = loaded["e2b"]
    drafts = drafter_proposer(drafter, target)

    def slow(*args, **kwargs):  # the host takes 0.1 s to build a drafting round
        time.sleep(0.1)
        return drafts(*args, **kwargs)

    policy = EveryFourth()
    engine = Engine(target, drafter, num_draft_tokens=policy, max_batch=2, propose=slow)
    for prompt in prompts(19, [12, 15]):
        engine.add(Request(prompt=prompt, max_tokens=40, stop_ids=frozenset()))
    while engine.busy:
        engine.step()
    drafting = [(s, own) for k, s, own in policy.told if k]
    plain = [(s, own) for k, s, own in policy.told if not k]
    assert len(drafting) >= 3 and len(plain) >= 6, policy.told
    assert all(own >= 0.1 > s for s, own in drafting), drafting
    assert all(own < 0.1 for _, own in plain) and any(s >= 0.1 for s, _ in plain), plain


def test_batch_generate_api(loaded, checkpoints):
    target, drafter = loaded["e2b"]
    _, tokenizer = load(checkpoints["e2b"][0])
    texts = ["the quick brown fox", "hello there", [2, 5, 9, 13]]
    result = batch_generate(target, tokenizer, texts, drafter, max_tokens=[12, 20, 8], num_draft_tokens=3)
    assert [len(t) <= n for t, n in zip(result.tokens, [12, 20, 8])]
    for text, tokens, prompt, n in zip(result.texts, result.tokens, texts, [12, 20, 8]):
        single = [r for r in _stream(target, tokenizer, prompt, n)]
        assert tokens == [r.token for r in single]
        assert text == "".join(r.text for r in single)
    assert result.total.generation_tokens == sum(map(len, result.tokens)) and result.total.accepted > 0
    chunks = list(stream_batch_generate(target, tokenizer, texts, drafter, max_tokens=8, num_draft_tokens=3))
    assert {c.index for c in chunks} == {0, 1, 2} and all(c.tokens for c in chunks if not c.finish_reason)
    assert sum(c.finish_reason is not None for c in chunks) == 3


def _stream(target, tokenizer, prompt, n):
    from mlx_gemma_mtp import stream_generate

    return stream_generate(target, tokenizer, prompt, n)


def test_bad_prompts_are_refused_before_anything_runs(loaded, checkpoints, monkeypatch):
    target, drafter = loaded["dense"]
    _, tokenizer = load(checkpoints["dense"][0])
    monkeypatch.setattr(Engine, "step", lambda self: pytest.fail("a step ran"))
    context = target.args.max_position_embeddings
    for bad, message in (
        ([], "prompt 1: prompt is empty"),
        ([5, VOCAB_SIZE + 3], r"prompt 1: prompt token ids \[515\] are outside the vocabulary"),
        (
            [5] * context,
            f"prompt 1: prompt of {context} tokens does not fit the model's context of {context}",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            batch_generate(target, tokenizer, ["fine", bad, "also fine"], drafter, max_tokens=8)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        batch_generate(target, tokenizer, [], drafter)
    with pytest.raises(ValueError, match="one value or one per prompt"):
        batch_generate(target, tokenizer, ["a", "b"], drafter, max_tokens=[3])
    with pytest.raises(ValueError, match="seed must be an int"):
        batch_generate(target, tokenizer, ["a"], drafter, temperature=1.0, seed=-1)
    with pytest.raises(ValueError, match="prompt 1: seed must be an int"):
        batch_generate(target, tokenizer, ["a", "b"], drafter, temperature=1.0, seed=[3, 2**64])
