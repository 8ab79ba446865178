"""Draft-length policies: their decisions with injected costs and acceptance, the loop running
whatever they choose (k = 0 plain stretches included) exactly, and the on-disk costs."""

from __future__ import annotations

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp import costs as costs_module
from mlx_gemma_mtp import load, load_drafter, stream_generate
from mlx_gemma_mtp.draft_length import MAX_DRAFT, PROBE_FIRST, PROBE_LAST, Auto, Costs, Fixed, Heuristic
from mlx_gemma_mtp.load import load_target
from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.speculative import DraftStats, drafter_proposer, plain_tokens, speculative_tokens
from tests.fixtures import VOCAB_SIZE
from tests.test_sampling import take

# A GPU's shape (memory-bound: verifying 17 tokens costs little more than 1; a drafter step is a
# tenth of a target forward) and a CPU's (compute-bound: a forward costs about its token count).
GPU = Costs(plain=1.0, verify=tuple(1.03 + 0.02 * k for k in range(MAX_DRAFT + 1)), draft=0.1)
CPU = Costs(plain=1.0, verify=tuple(1.0 + 0.9 * k for k in range(MAX_DRAFT + 1)), draft=0.5)
# MLX CUDA's 4-bit 31B: a verify of 2-7 rows takes a slow path (2.5x a plain token), 8+ do not.
SLOW_SHORT = Costs(plain=1.0, verify=(1.0,) + (2.5,) * 6 + (2.6,) * (MAX_DRAFT - 6), draft=0.05)


def expected_rate(costs: Costs, acceptance, k: int) -> float:
    """Tokens per second of a round drafting k, from per-position acceptance a_1..a_k."""
    return sum(np.prod(acceptance[:i]) for i in range(k + 1)) / costs.round(k)


def with_acceptance(policy: Auto, acceptance, rounds: float = 1e6) -> Auto:
    """As if `rounds` rounds had reached every position and kept position j at rate a_j."""
    policy.tries = [rounds] * MAX_DRAFT
    policy.hits = [rounds * a for a in acceptance]
    policy.plain_left, policy.probe_gap = policy.probe_first, 2 * policy.probe_first  # as after drafting
    policy.rounds_seen = int(rounds)
    return policy


# ---------------------------------------------------------------------------------------------
# Decisions


def test_fixed_and_heuristic():
    assert [Fixed(5).choose(limit) for limit in (9, 5, 2, 0)] == [5, 5, 2, 0]
    assert Fixed(0).choose(7) == 0
    policy = Heuristic()
    seen = []
    for accepted_all in [True] * 6 + [False] * 20:
        k = policy.choose(100)
        seen.append(k)
        policy.observe(k, k if accepted_all else 0)
    # +2 after a full accept, -1 otherwise, within 1..MAX_DRAFT (transformers' "heuristic").
    assert seen[:7] == [6, 8, 10, 12, 14, 16, 16] and seen[7:10] == [15, 14, 13] and seen[-1] == 1
    assert policy.choose(0) == 0


@pytest.mark.parametrize("costs", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("shape", ["flat 0.8", "flat 0.5", "decaying", "flat 0.98"])
def test_auto_picks_the_best_expected_rate(costs, shape):
    acceptance = {
        "flat 0.8": [0.8] * MAX_DRAFT,
        "flat 0.5": [0.5] * MAX_DRAFT,
        "decaying": [0.95 * 0.85**j for j in range(MAX_DRAFT)],
        "flat 0.98": [0.98] * MAX_DRAFT,
    }[shape]
    policy = with_acceptance(Auto(costs), acceptance)
    rates = [expected_rate(costs, acceptance, k) for k in range(MAX_DRAFT + 1)]
    assert policy.choose(MAX_DRAFT) == int(np.argmax(rates))
    for limit in (0, 1, 3):  # never past what is left to generate
        assert policy.choose(limit) == int(np.argmax(rates[: limit + 1]))


def test_auto_acceptance_estimates():
    policy = Auto(GPU)
    assert policy.acceptance() == [0.5] * MAX_DRAFT  # the prior, before any round
    for _ in range(300):  # positions 1-2 always kept, position 3 never
        policy.observe(4, 2)
    a = policy.acceptance()
    assert a[0] > 0.95 and a[1] > 0.95 and a[2] < 0.05
    assert a[3] == pytest.approx(a[2])  # never reached: leans on the position before


def test_auto_plain_when_drafting_does_not_pay():
    """A drafter that is never right, or that costs as much as the target: k = 0, probing again
    after 16 (more where a probe costs more), then twice as many, ... 256 plain tokens, with
    the best k >= 1."""
    costly = Costs(plain=1.0, verify=GPU.verify, draft=1.0)
    for costs, acceptance in ((GPU, [0.0] * MAX_DRAFT), (costly, [0.6] * MAX_DRAFT)):
        policy = with_acceptance(Auto(costs), acceptance)
        chosen = [policy.choose(100) for _ in range(1500)]
        probes = [i for i, k in enumerate(chosen) if k]
        first = policy.probe_first
        assert first == (PROBE_FIRST if costs is GPU else 105)  # a costly drafter: 1.05 / 1%
        assert all(chosen[i] >= 1 for i in probes) and probes[0] == first
        gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]  # plain tokens between probes
        doubling = [first * 2**i for i in range(1, 5) if first * 2**i < PROBE_LAST]
        assert gaps == doubling + [PROBE_LAST] * (len(gaps) - len(doubling))
        assert len(gaps) >= 5


def simulate(policy, costs: Costs, acceptance, tokens: int, seed: int) -> float:
    """Seconds to generate `tokens` tokens when draft j is kept with probability a_j."""
    rng = np.random.RandomState(seed)
    made, seconds = 1, 0.0  # the first token comes from the prefill
    while made < tokens:
        limit = tokens - made - 1
        k = policy.choose(limit)
        assert 0 <= k <= min(limit, MAX_DRAFT)
        if k == 0:
            made, seconds = made + 1, seconds + costs.plain
            continue
        m = 0
        while m < k and rng.random_sample() < acceptance[m]:
            m += 1
        policy.observe(k, m)
        made, seconds = made + m + 1, seconds + costs.round(k)
    return seconds


def test_auto_with_a_useless_drafter_is_within_2_percent_of_plain():
    tokens = 4000
    for costs in (GPU, CPU, SLOW_SHORT):
        auto = simulate(Auto(costs), costs, [0.0] * MAX_DRAFT, tokens, seed=0)
        plain = (tokens - 1) * costs.plain
        assert auto <= 1.02 * plain, f"auto {auto / plain:.3f} x plain"


@pytest.mark.parametrize("costs", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("shape", ["flat 0.8", "decaying", "alternating"])
def test_auto_matches_the_best_fixed_k(costs, shape):
    """Simulated, with the same acceptance draws: auto is within 3% of the best fixed k (which
    it cannot know in advance; on the CPU shape that is plain decoding)."""
    acceptance = {
        "flat 0.8": [0.8] * MAX_DRAFT,
        "decaying": [0.95 * 0.85**j for j in range(MAX_DRAFT)],
        "alternating": [0.9, 0.3] * (MAX_DRAFT // 2),
    }[shape]
    tokens = 20000
    auto = simulate(Auto(costs), costs, acceptance, tokens, seed=1)
    best = min(simulate(Fixed(k), costs, acceptance, tokens, seed=1) for k in range(MAX_DRAFT + 1))
    print(f"\n{shape}: auto {tokens / auto:.3f} tokens per unit, best fixed k {tokens / best:.3f}")
    assert auto <= 1.03 * best


def test_auto_follows_a_change_of_acceptance():
    """The drafter goes bad mid-generation (e.g. from prose to a table of numbers), then good."""
    policy = with_acceptance(Auto(GPU), [0.9] * MAX_DRAFT, rounds=50)
    assert policy.choose(100) > 5
    for _ in range(100):
        policy.observe(policy.choose(100) or 1, 0)
    assert policy.choose(100) == 0
    recovered = None
    for n in range(2000):
        k = policy.choose(100)
        if k == 0:
            continue
        policy.observe(k, k)  # good again
        if k > 5:
            recovered = n
            break
    assert recovered is not None, "never went back to drafting"


def test_auto_decodes_plainly_until_its_first_round_is_seen():
    """The loop asks one round ahead: the choice after the first drafting round is made before
    that round is read back. It knows nothing the first did not, so it is a plain step (two
    rounds on the prior would cost a useless drafter two rounds); from the first observation
    on, auto chooses as before."""
    policy = Auto(GPU)
    first = policy.choose(100)
    assert first > 0
    assert [policy.choose(100) for _ in range(3)] == [0, 0, 0]
    policy.observe(first, first)  # all kept
    assert policy.choose(100) > 0 and policy.choose(100) > 0  # now one round ahead, on what it saw


def test_auto_rejects_costs_of_the_wrong_length():
    with pytest.raises(ValueError, match="costs.verify has 3 entries"):
        Auto(Costs(plain=1.0, verify=(1.0, 1.0, 1.0), draft=0.1))


# ---------------------------------------------------------------------------------------------
# The loop runs what a policy chooses


class Script:
    """A policy that plays a given sequence of k forever."""

    def __init__(self, moves):
        self.moves = itertools.cycle(moves)

    def choose(self, limit):
        return min(next(self.moves), limit)

    def observe(self, k, accepted):
        """A script does not adapt."""

    def observe_time(self, k, seconds):
        """... to acceptance or to timing."""


MOVES = [3, *[0] * 5, 7, 0, 1, *[0] * 12, 16, 2, 0, 0]  # 0: one plain token


@pytest.fixture(scope="module")
def dense(loaded):
    return loaded["dense"]


def _prompt(seed):
    return mx.array(np.random.RandomState(seed).randint(4, VOCAB_SIZE, size=(1, 30)), dtype=mx.int32)


def test_every_move_is_exact(dense):
    """Plain stretches between drafting rounds of every size: still the plain greedy output, and
    a stop anywhere leaves the cache ready to continue."""
    target, drafter = dense
    prompt, n = _prompt(0), 120
    plain = take(plain_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1)), n)
    stats, requests = DraftStats(), []
    propose = drafter_proposer(drafter, target)

    def recording(request, cache):
        requests.append(request)
        return propose(request, cache)

    cache = target.make_cache(MAX_DRAFT + 1)
    assert take(speculative_tokens(target, prompt, cache, recording, Script(MOVES), n, stats), n) == plain
    assert all(stats.k_histogram[k] for k in MOVES) and stats.accepted > 0
    # Every round, after a plain stretch or not, drafts from the right token and hidden state.
    sequence = np.array(prompt)[0].tolist() + plain
    hidden = target(mx.array([sequence]), target.make_cache(MAX_DRAFT + 1))[0]  # [len, H]
    for request in requests:
        assert request.token.item() == sequence[request.position]
        assert np.allclose(np.array(request.hidden[0, 0]), np.array(hidden[request.position - 1]), atol=1e-4)
    for stop in (4, 9, 17, 40):  # inside plain stretches and rounds alike
        cache = target.make_cache(MAX_DRAFT + 1)
        head = take(speculative_tokens(target, prompt, cache, propose, Script(MOVES), n, DraftStats()), stop)
        assert all(c.offset == prompt.shape[1] + stop - 1 for c in cache)
        assert head + take(plain_tokens(target, mx.array([[head[-1]]]), cache), n - stop) == plain


def test_every_move_samples_with_one_token_left(dense):
    """Sampling through the same moves, with top_k = 1 (p a point mass): the greedy output."""
    target, drafter = dense
    prompt, n = _prompt(1), 80
    plain = take(plain_tokens(target, prompt, target.make_cache(MAX_DRAFT + 1)), n)
    tokens = speculative_tokens(
        target, prompt, target.make_cache(MAX_DRAFT + 1), drafter_proposer(drafter, target), Script(MOVES), n,
        DraftStats(), sampling=make_sampling(temperature=1.0, top_k=1), key=mx.random.key(0),
    )  # fmt: skip
    assert take(tokens, n) == plain


@pytest.mark.parametrize("schedule", ["auto", "heuristic"])
def test_stream_generate_schedules(schedule, checkpoints, random_checkpoints):
    """Through the public API: exact, and the last response's statistics add up."""
    for pair in (checkpoints, random_checkpoints):
        model, tokenizer = load(pair["e2b"][0])
        drafter = load_drafter(pair["e2b"][1], model)
        prompt = np.array(_prompt(2))[0].tolist()
        plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=60)]
        out = list(stream_generate(model, tokenizer, prompt, 60, draft_model=drafter, num_draft_tokens=schedule))
        assert [r.token for r in out] == plain
        last = out[-1]
        histogram = last.draft_lengths
        assert len(histogram) == MAX_DRAFT + 1
        rounds = sum(histogram[1:])
        drafted = sum(k * histogram[k] for k in range(MAX_DRAFT + 1))
        assert drafted == last.drafted
        assert last.acceptance_rate == pytest.approx(last.accepted / max(last.drafted, 1))
        assert last.mean_accepted == pytest.approx(last.accepted / rounds if rounds else 0.0)
        if last.finish_reason == "length":  # every token accounted for: prefill, rounds, plain steps
            assert last.generation_tokens == 1 + last.accepted + rounds + histogram[0]


# ---------------------------------------------------------------------------------------------
# Costs on disk


def test_costs_are_measured_once_and_kept(dense, tmp_path, monkeypatch):
    target, drafter = dense
    first = costs_module.load_costs(target, drafter, tmp_path)
    assert len(first.verify) == MAX_DRAFT + 1 and first.plain > 0 and first.draft > 0
    assert all(t > 0 for t in first.verify)
    [path] = tmp_path.glob("costs-*.json")
    saved = json.loads(path.read_text())
    assert saved["mlx"] == mx.__version__ and "cpu" in saved["device"].lower()

    def measure(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(costs_module, "measure_costs", measure)
    assert costs_module.load_costs(target, drafter, tmp_path) == first
    path.write_text("{")  # a damaged file (a write cut short) is measured again
    monkeypatch.undo()
    again = costs_module.load_costs(target, drafter, tmp_path)
    assert len(again.verify) == MAX_DRAFT + 1 and json.loads(path.read_text())["plain"] == again.plain


def test_costs_are_what_the_loops_clock_says(dense, monkeypatch):
    """Every k = 0..MAX_DRAFT runs in the loop itself (a warm-up pass, then REPEATS passes)
    and costs the median of what the loop's clock reported; verify[k] is a round less its
    drafter steps, at least a plain step."""
    target, drafter = dense
    prompt = mx.arange(costs_module.CONTEXT, dtype=mx.int32)[None]
    propose = drafter_proposer(drafter, target)
    timed = costs_module._loop_times(target, propose, prompt, 3, 2)  # the real loop, k = 3
    assert len(timed) == 2 and all(t > 0 for t in timed)

    runs = []

    def loop_times(target, propose, prompt, k, rounds):
        runs.append(k)
        return [0.010 + 0.002 * k + 0.001 * i for i in range(rounds)]  # median: + 0.001

    monkeypatch.setattr(costs_module, "_loop_times", loop_times)
    monkeypatch.setattr(costs_module, "_drafter_step", lambda *_: 0.0015)
    measured = costs_module.measure_costs(target, propose)
    assert sorted(runs) == sorted(list(range(MAX_DRAFT + 1)) * (costs_module.REPEATS + 1))
    assert measured.plain == pytest.approx(0.011) and measured.draft == 0.0015
    for k in range(MAX_DRAFT + 1):
        assert measured.round(k) == pytest.approx(0.011 + 0.002 * k)
    runs.clear()  # the benchmark's ideal asks for more passes
    assert costs_module.measure_costs(target, propose, repeats=6) == measured
    assert sorted(runs) == sorted(list(range(MAX_DRAFT + 1)) * 7)


def test_cost_key_ignores_what_changes_between_generations(dense, monkeypatch):
    """MLX CUDA's device_info reports free memory: the key must not follow it (every
    generation would measure again)."""
    target, drafter = dense
    info = dict(mx.device_info())
    monkeypatch.setattr(mx, "device_info", lambda: info | {"free_memory": 1})
    key = costs_module.cost_key(target, drafter)
    monkeypatch.setattr(mx, "device_info", lambda: info | {"free_memory": 2})
    assert costs_module.cost_key(target, drafter) == key
    monkeypatch.setattr(mx, "device_info", lambda: info | {"device_name": "another"})
    assert costs_module.cost_key(target, drafter) != key
    monkeypatch.setattr(mx, "device_info", lambda: info)
    monkeypatch.setattr(costs_module, "METHOD", costs_module.METHOD - 1)  # costs measured otherwise
    assert costs_module.cost_key(target, drafter) != key


def test_cost_key_tells_models_apart(checkpoints):
    target = load_target(checkpoints["dense"][0])
    drafter = load_drafter(checkpoints["dense"][1], target)
    key = costs_module.cost_key(target, drafter)
    assert costs_module.cost_key(target, drafter) == key
    half = load_target(checkpoints["dense"][0], dtype=mx.bfloat16)
    assert costs_module.cost_key(half, drafter) != key
    e2b = load_target(checkpoints["e2b"][0])
    assert costs_module.cost_key(e2b, load_drafter(checkpoints["e2b"][1], e2b)) != key


def test_auto_learns_what_rounds_really_cost():
    """Measured costs say drafting pays at this acceptance; the clock says rounds take twice
    as long in the loop: auto must turn to plain decoding."""
    costs = Costs(plain=1.0, verify=tuple(1.1 + 0.02 * i for i in range(MAX_DRAFT + 1)), draft=0.05)
    naive, timed = Auto(costs), Auto(costs)
    for policy in (naive, timed):
        for _ in range(40):
            k = policy.choose(100) or 2
            policy.observe(k, 1 if k > 1 else 0)  # the first draft kept, the second never
            if policy is timed:
                policy.observe_time(k, 2 * costs.round(k))
                policy.observe_time(0, costs.plain)
    assert np.argmax(naive.rates(MAX_DRAFT)) > 0
    assert np.argmax(timed.rates(MAX_DRAFT)) == 0


def test_auto_never_drafts_with_a_useless_drafter_whatever_the_clock_says():
    """A noisy timing says a one-draft round is cheaper than a plain token: with nothing ever
    accepted drafting cannot pay, so auto still decodes plainly (bar its probes)."""
    policy = with_acceptance(Auto(GPU), [0.0] * MAX_DRAFT)
    policy.observed = {0: 2.0, 1: 1.0, 2: 1.5}
    assert [policy.choose(100) for _ in range(PROBE_FIRST)] == [0] * PROBE_FIRST


def useless_drafter_choices(
    policy: Auto, costs: Costs, steps: int, plain_factor, round_factor: float = 1.0
) -> list[int]:
    """What auto chooses over `steps` choices when no draft is ever kept, every round costs
    `round_factor` times its measurement and the plain step of choice i `plain_factor(i)` times."""
    chosen = []
    for i in range(steps):
        k = policy.choose(1000)
        chosen.append(k)
        if k:
            policy.observe(k, 0)
            policy.observe_time(k, costs.round(k) * round_factor)
        else:
            policy.observe_time(0, costs.plain * plain_factor(i))
    return chosen


def test_a_hiccup_on_a_plain_step_does_not_start_useless_drafting():
    """Seen on MLX CUDA (31B, nothing accepted): one slow plain step made plain decoding look
    dearer than a round, auto drafted, and with no plain steps chosen nothing corrected it."""
    chosen = useless_drafter_choices(Auto(GPU), GPU, 300, lambda i: 2.5 if i == 40 else 1.0)
    assert sum(k > 0 for k in chosen[40:]) <= 4, chosen  # its probes, no more


def test_a_slow_first_plain_step_does_not_start_useless_drafting():
    """Seen on the CPU (tiny model, nothing accepted): the first plain step timed took 2x and,
    as plain decoding's whole record, made a round look nearly free; with no plain steps
    chosen after that, nothing corrected it. A k's cost is believed from its third timing
    on (their median)."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.4,) * MAX_DRAFT, draft=0.05)
    policy = Auto(costs)
    policy.observe(policy.choose(100), 0)  # the first round: nothing kept
    chosen = useless_drafter_choices(policy, costs, 40, lambda i: 2.0 if i == 0 else 1.0)
    assert chosen[:PROBE_FIRST] == [0] * PROBE_FIRST and sum(k > 0 for k in chosen) <= 2, chosen  # probes only


def test_plain_steps_not_yet_believed_are_scaled_as_rounds_are():
    """Seen on MLX CUDA (E2B, nothing accepted): plain steps took 0.7x their measurement. Until
    their third timing plain decoding was taken at its bare measurement while untimed rounds
    were scaled by the 0.7 its first timing showed, and auto drafted 4 useless rounds in a row
    after its first."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.6,) * MAX_DRAFT, draft=0.05)
    policy = Auto(costs)
    policy.observe(policy.choose(100), 0)  # the first round: nothing kept
    chosen = useless_drafter_choices(policy, costs, 30, lambda i: 0.7)
    assert chosen[:PROBE_FIRST] == [0] * PROBE_FIRST and sum(k > 0 for k in chosen) <= 1, chosen  # one probe


def test_one_failed_round_is_thin_evidence():
    """A first round whose first draft is rejected (one time in five at alpha = 0.8) must not
    stop drafting for as long as a failed probe would justify where rounds are dear (31B 4-bit):
    the next probe comes after PROBE_FIRST plain tokens; when it fails too, after probe_first,
    then twice as many."""
    policy = Auto(SLOW_SHORT)
    assert policy.probe_first > 4 * PROBE_FIRST  # a round costs 2.6 plain tokens
    chosen = useless_drafter_choices(policy, SLOW_SHORT, 1 + PROBE_FIRST + 1 + 3 * policy.probe_first, lambda i: 1.0)
    probes = [i for i, k in enumerate(chosen) if k]
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]  # plain tokens between drafting rounds
    doubled = min(2 * policy.probe_first, PROBE_LAST)
    assert probes[0] == 0 and gaps[:3] == [PROBE_FIRST, policy.probe_first, doubled], probes


def test_auto_learns_each_draft_lengths_own_cost():
    """The measured curve is flat, but in the loop every verify of 10 or more tokens takes a
    slow path (as MLX CUDA's quantized verify of 2-7 rows does): auto must settle below it,
    and a single hiccup (a kernel compiling) must not throw it off."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.2,) * MAX_DRAFT, draft=0.02)
    policy = Auto(costs)
    chosen = []
    for i in range(80):
        k = policy.choose(100)
        chosen.append(k)
        if k == 0:
            policy.observe_time(0, costs.plain)
            continue
        policy.observe(k, k)  # every draft kept
        slow = 10 if k >= 9 else 1
        policy.observe_time(k, costs.round(k) * slow * (50 if i == 60 else 1))
    assert 1 <= chosen[-1] <= 8 and all(k <= 8 for k in chosen[-15:]), chosen


def test_the_clock_alone_does_not_end_a_plain_stretch():
    """In a plain stretch only plain steps are timed: when the card slows down (or a few plain
    steps run slow), plain decoding looks dearer while the rounds' costs stay as last timed, and
    a useless drafter looked worth a round again. Seen on MLX CUDA (E2B bf16, alpha = 0):
    ~8 useless k = 1 rounds per 128 tokens as plain steps swung between 8 and 15 ms. A stretch
    ends at its probe, or when a round read back has changed the acceptance estimate."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.3,) * MAX_DRAFT, draft=0.1)
    policy = Auto(costs)
    first = policy.choose(100)
    policy.observe(first, 0)
    policy.observe_time(first, costs.round(first))
    chosen = useless_drafter_choices(policy, costs, PROBE_FIRST + 1, lambda i: 1.0 if i < 3 else 1.5)
    assert chosen[:PROBE_FIRST] == [0] * PROBE_FIRST and chosen[PROBE_FIRST] > 0, chosen  # then its probe


def test_a_round_read_back_during_a_plain_stretch_is_weighed():
    """The loop asks one round ahead: a good round read back after the choice that began a plain
    stretch (made without it) resumes drafting at once."""
    policy = with_acceptance(Auto(GPU), [0.0] * MAX_DRAFT, rounds=10)
    assert policy.choose(100) == 0  # the stretch begins
    for _ in range(2):
        policy.observe(8, 8)  # rounds queued before that choice, all kept
    assert policy.choose(100) > 0


def test_a_round_believed_at_its_floor_must_beat_plain_by_a_margin():
    """Seen on MLX CUDA (26B-A4B 4-bit, nothing accepted): verifies measured as cheap as a plain
    token, plain steps last timed in a slow spell, and every k = 1 round believed to cost a
    plain step and a drafter step, so drafting looked worth it down to 3% acceptance: 43
    useless rounds in a row. Believed at that floor a round must beat plain by FLOOR_MARGIN."""
    costs = Costs(plain=1.0, verify=(1.0,) * (MAX_DRAFT + 1), draft=0.03)
    chosen = useless_drafter_choices(Auto(costs), costs, 60, lambda i: 1.0)
    assert sum(k > 0 for k in chosen) <= 8, chosen


def test_a_failed_probe_does_not_end_the_plain_stretch():
    """Seen on MLX CUDA (E2B bf16 and 26B-A4B, nothing accepted): a failed probe's own timing,
    a little under its measurement, made every untimed round look cheaper, and 2-6 rounds
    followed it. Only a round that kept a draft ends a stretch, its probes included."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.3,) * MAX_DRAFT, draft=0.1)
    policy = Auto(costs)
    policy.observe(policy.choose(100), 0)  # the first round, untimed: nothing kept
    steps = PROBE_FIRST + 1 + policy.probe_first + 1
    chosen = useless_drafter_choices(policy, costs, steps, lambda i: 1.0, round_factor=0.6)
    probes = [i for i, k in enumerate(chosen) if k]
    # The first probe, then none until the next one.
    assert probes == [PROBE_FIRST, PROBE_FIRST + 1 + policy.probe_first], chosen


def test_rounds_timed_dear_before_any_plain_step_end_the_drafting():
    """Seen on MLX CUDA (26B-A4B 4-bit, nothing accepted): a generation opens with rounds, and
    a plain step behind a drafting round is not timed. The opening rounds took 2-2.5 plain
    tokens (measured 1.2-1.3); scaled by their ratio, plain decoding looked as dear, and 5-9
    useless rounds ran. Rounds timed dear must not make an untimed plain token look dearer."""
    costs = Costs(plain=1.0, verify=(1.0,) + (1.15,) * MAX_DRAFT, draft=0.03)
    policy = Auto(costs)
    first = policy.choose(100)
    assert policy.choose(100) == 0  # behind the first round, until it is seen
    policy.observe(first, 0)  # read back, not timed (queued into an empty pipeline)
    second = policy.choose(100)
    third = policy.choose(100)  # queued before the second is read back
    assert second > 0 and third > 0  # a_1 = 1/3 and rounds measured at 1.2 plain tokens: worth a try
    policy.observe(second, 0)
    policy.observe_time(second, 2.5 * costs.round(second))
    assert [policy.choose(100) for _ in range(PROBE_FIRST)] == [0] * PROBE_FIRST
