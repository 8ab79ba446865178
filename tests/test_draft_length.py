"""Draft-length policies through their public methods only: Fixed, the heuristic, the costs of a
batch, auto's parts (acceptance, cost model, probes) and its decisions, and the loop-faithful
simulation's targets. Then the loop running whatever a policy chooses, and the costs on disk
(the engine running what a policy chooses and the costs on disk: tests/test_costs.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator

import numpy as np
import pytest

from bench import simulate
from mlx_gemma_mtp.draft_length import (
    MAX_DRAFT,
    Acceptance,
    Auto,
    CostModel,
    Costs,
    Fixed,
    Heuristic,
    Probes,
    Rules,
)


def one_row(verify, draft: float) -> Costs:
    """Costs measured at B = 1 only: verify[k] for k = 0..MAX_DRAFT (verify[0]: a plain step)."""
    return Costs(verify=(tuple(verify),), draft=(draft,))


# A GPU's shape (memory-bound: verifying 17 tokens costs little more than 1; a drafter step is a
# tenth of a target forward) and a CPU's (compute-bound: a forward costs about its token count).
GPU = one_row([1.0] + [1.03 + 0.02 * k for k in range(1, MAX_DRAFT + 1)], 0.1)
CPU = one_row([1.0 + 0.9 * k for k in range(MAX_DRAFT + 1)], 0.5)
# MLX CUDA's 4-bit 31B: a verify of 2-7 rows takes a slow path (2.5x a plain token), 8+ do not.
SLOW_SHORT = one_row((1.0,) + (2.5,) * 6 + (2.6,) * (MAX_DRAFT - 6), 0.05)
STEADY = Rules(decay=1.0)  # counts that do not forget: taught acceptance stays as taught
DRAFTED = {"shadow_probe": False, "shadow_opening": False}  # probes draft rounds (no shadows)
DRAFTING = Rules(**DRAFTED)


def reach(acceptance) -> list[float]:
    """P(a round keeps at least m drafts), m = 0..MAX_DRAFT, from per-position a_1..a_MAX_DRAFT."""
    return list(itertools.accumulate(acceptance, operator.mul, initial=1.0))


def expected_rate(costs: Costs, acceptance, k: int, batch: int = 1) -> float:
    """Tokens per second of a round of `batch` rows drafting k, each row at a_1..a_k."""
    return batch * sum(reach(acceptance)[: k + 1]) / costs.round(k, batch)


def teach(policy, acceptance, rounds: int = 3000, rows=(0,)) -> None:
    """Rounds of MAX_DRAFT drafts whose kept counts follow a_j in exact proportion (an
    equidistributed sequence, so any stretch of rounds has the right mix)."""
    chances = reach(acceptance)[1:]
    for i in range(rounds):
        u = (i * 0.6180339887498949) % 1
        policy.observe(MAX_DRAFT, {row: sum(u < c for c in chances) for row in rows})


def useless_drafter_choices(policy, costs: Costs, steps: int) -> list[int]:
    """What `policy` chooses over `steps` choices at B = 1 when no draft is ever kept and every
    round and plain step costs what was measured (told at once: no lag)."""
    chosen = []
    for _ in range(steps):
        chosen.append(policy.choose(1000, [0]))
        if chosen[-1]:
            policy.observe(chosen[-1], {0: 0})
        policy.observe_time(chosen[-1], 1, costs.round(chosen[-1]))
    return chosen


# ---------------------------------------------------------------------------------------------
# Fixed, the heuristic, costs


def test_fixed_drafts_its_k_for_every_batch():
    assert [Fixed(5).choose(limit, [0, 1, 2]) for limit in (9, 5, 2, 0)] == [5, 5, 2, 0]
    assert Fixed(0).choose(7, [0]) == 0
    with pytest.raises(ValueError, match="0..16, got 17"):
        Fixed(MAX_DRAFT + 1)


def test_heuristic_is_transformers_schedule_per_row():
    policy, seen = Heuristic(), []
    for accepted_all in [True] * 6 + [False] * 20:
        k = policy.choose(100, [0])
        seen.append(k)
        policy.observe(k, {0: k if accepted_all else 0})
    # +2 after a full accept, -1 otherwise, within 1..MAX_DRAFT (transformers' "heuristic").
    assert seen[:7] == [6, 8, 10, 12, 14, 16, 16] and seen[7:10] == [15, 14, 13] and seen[-1] == 1
    assert policy.choose(0, [0]) == 0
    # In a batch each row keeps its own schedule and the round drafts what the keenest asks for.
    assert policy.choose(100, [0, 1]) == 6  # row 1 is new: it starts at 6, row 0 asks for 1
    policy.observe(6, {0: 6, 1: 2})  # row 0 kept all it asked for (1), row 1 did not
    assert policy.choose(100, [0]) == 3 and policy.choose(100, [1]) == 5 and policy.choose(100, [0, 1]) == 5
    policy.forget(1)
    assert policy.choose(100, [1]) == 6  # a row that came back starts again


def test_costs_between_and_beyond_the_measured_batch_sizes():
    costs = Costs(
        batches=(2, 4),
        verify=(
            tuple(2.0 + k for k in range(MAX_DRAFT + 1)),
            tuple(4.0 + 2 * k for k in range(MAX_DRAFT + 1)),
        ),
        draft=(0.1, 0.3),
    )
    assert costs.plain(2) == 2.0 and costs.round(3, 4) == pytest.approx(10.0 + 3 * 0.3)
    assert costs.plain(3) == pytest.approx(3.0) and costs.drafter(3) == pytest.approx(0.2)  # linear between
    assert costs.plain(1) == 2.0 and costs.step(5, 1) == 7.0  # below the smallest: the smallest's
    assert costs.plain(8) == pytest.approx(8.0) and costs.round(1, 16) == pytest.approx(
        4 * (6.0 + 0.3)
    )  # per row
    assert costs.round(0, 4) == costs.plain(4)


def test_costs_round_trip_through_json_and_refuse_bad_input():
    costs = Costs(batches=(1, 8), verify=(GPU.verify[0], CPU.verify[0]), draft=(0.1, 0.4))
    assert Costs.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    with pytest.raises(ValueError, match="costs JSON needs batches"):
        Costs.from_json({"plain": 1.0, "verify": [1.0] * 17, "draft": 0.1})  # the one-row format
    with pytest.raises(ValueError, match="at batch 1 has 3 entries, expected 17"):
        one_row((1.0, 1.0, 1.0), 0.1)
    with pytest.raises(ValueError, match="2 batch sizes but 1 verify rows"):
        Costs(batches=(1, 2), verify=GPU.verify, draft=(0.1, 0.1))
    with pytest.raises(ValueError, match="ascending"):
        Costs(batches=(4, 2), verify=GPU.verify * 2, draft=(0.1, 0.1))
    with pytest.raises(ValueError, match="finite and positive"):
        one_row([0.0] * (MAX_DRAFT + 1), 0.1)


# ---------------------------------------------------------------------------------------------
# Auto's parts


def test_acceptance_per_position():
    acceptance = Acceptance(Rules())
    assert acceptance.of_row(0) == [0.5] * MAX_DRAFT  # the prior, before any round
    for _ in range(300):  # positions 1-2 always kept, position 3 never
        acceptance.observe(4, {0: 2})
    a = acceptance.of_row(0)
    assert a[0] > 0.95 and a[1] > 0.95 and a[2] < 0.05
    assert a[3] == pytest.approx(a[2])  # never reached: leans on the position before
    assert acceptance.expected(2, [0]) == pytest.approx([1.0, 1 + a[0], 1 + a[0] + a[0] * a[1]])
    with pytest.raises(ValueError, match="row 0 kept 5 of 4 drafts"):
        acceptance.observe(4, {0: 5})


def test_acceptance_per_row():
    """Each row its own estimate; a new row starts from the others'; the round's tokens are the
    sum over its rows; a row that leaves stays among the others' (`remember_left`; off: it takes
    its counts with it)."""
    acceptance = Acceptance(STEADY)
    teach(acceptance, [0.9] * MAX_DRAFT, rows=(0,))
    teach(acceptance, [0.2] * MAX_DRAFT, rows=(1,))
    good, bad, new = (acceptance.of_row(r) for r in (0, 1, 2))
    assert good[0] == pytest.approx(0.9, abs=0.01) and bad[0] == pytest.approx(0.2, abs=0.01)
    assert bad[0] < new[0] < good[0]
    both = acceptance.expected(MAX_DRAFT, [0, 1])
    assert both == pytest.approx(
        [x + y for x, y in zip(*(acceptance.expected(MAX_DRAFT, [r]) for r in (0, 1)))]
    )
    acceptance.forget(0)
    assert acceptance.of_row(2) == new  # row 0's rounds still count for a new row ...
    assert acceptance.of_row(0) == acceptance.of_row(2)  # ... and row 0 is new again
    forgetful = Acceptance(dataclasses.replace(STEADY, remember_left=False))
    teach(forgetful, [0.9] * MAX_DRAFT, rows=(0,))
    teach(forgetful, [0.2] * MAX_DRAFT, rows=(1,))
    forgetful.forget(0)
    assert forgetful.of_row(2)[0] == pytest.approx(0.2, abs=0.01)  # only row 1's counts are left
    pooled = Acceptance(Rules(per_row=False, decay=1.0))
    teach(pooled, [0.9] * MAX_DRAFT, rows=(0,))
    teach(pooled, [0.2] * MAX_DRAFT, rows=(1,))
    assert pooled.of_row(0) == pooled.of_row(1)  # one estimate for the batch


def test_cost_model_learns_each_batch_and_length_from_the_clock():
    costs = Costs(
        batches=(1, 4), verify=(GPU.verify[0], tuple(2 * s for s in GPU.verify[0])), draft=(0.1, 0.2)
    )
    model = CostModel(costs, Rules())
    assert model.seconds(3, 1) == costs.round(3, 1) and model.seconds(0, 4) == costs.plain(4)  # as measured
    for factor in (2.0, 2.1, 1.9, 2.05, 1.95):
        model.observe(3, 1, factor * costs.round(3, 1))
    assert model.seconds(3, 1) == pytest.approx(2.0 * costs.round(3, 1))  # the median of its timings
    # Untimed ones: their measurement times the least timed / measured ratio, any batch size ...
    assert model.seconds(5, 1) == pytest.approx(2.0 * costs.round(5, 1))
    assert model.seconds(5, 4) == pytest.approx(2.0 * costs.round(5, 4))
    assert model.seconds(0, 1) == costs.plain(1)  # ... but dear rounds say nothing of a plain step
    model.observe(3, 1, 20 * costs.round(3, 1))  # one hiccup moves nothing beyond the timings' range
    assert model.seconds(3, 1) <= 2.05 * costs.round(3, 1)
    model.observe(2, 4, 1.5 * costs.round(2, 4))
    assert model.seconds(9, 4) == pytest.approx(1.5 * costs.round(9, 4))  # the least ratio: optimistic
    model.observe(0, 4, 0.5 * costs.plain(4))
    assert model.seconds(0, 4) == pytest.approx(0.5 * costs.plain(4))
    assert model.seconds(0, 1) == pytest.approx(0.5 * costs.plain(1))  # a faster card: plain steps too
    # ... and never under a plain step and k drafter steps (0.5 + 5 x 0.1 > 0.5 x 1.63).
    assert model.seconds(5, 1) == pytest.approx(model.floor(5, 1)) == pytest.approx(0.5 + 5 * 0.1)
    # A shape's first timing over 3x its estimate is a compile: passed over; a second is believed.
    before = model.seconds(7, 4)
    model.observe(7, 4, 10 * before)
    assert model.seconds(7, 4) == before
    model.observe(7, 4, 3.0)
    assert model.seconds(7, 4) == 3.0


def test_probes_after_a_short_stretch_and_only_a_kept_draft_ends_one():
    probes, chosen = Probes(Rules()), []
    for _ in range(300):  # plain pays throughout, no draft ever kept: probes of k = 3
        chosen.append(probes.choose(0, 3, 0, stretch=40))
    starts = [i for i, k in enumerate(chosen) if k]
    assert starts[0] == 0 and {chosen[i] for i in starts} == {3}  # nothing seen yet: a probe at once
    assert [b - a - 1 for a, b in itertools.pairwise(starts)] == [16, 40, 40, 40, 40, 40, 40]
    assert probes.choose(2, 3, 0, stretch=40) == 0  # the clock says drafting pays: not enough
    assert probes.choose(2, 3, 1, stretch=40) == 2  # a kept draft read back, and drafting pays
    assert probes.choose(0, 3, 1, stretch=40) == 0  # drafting stops paying: a short stretch again
    assert [probes.choose(0, 3, 1, stretch=40) for _ in range(16 + 40)] == [0] * 15 + [3] + [0] * 40
    free = Probes(Rules(kept_ends_stretch=False))
    assert free.choose(0, 3, 0, stretch=40) == 3 and free.choose(0, 3, 0, stretch=40) == 0
    assert free.choose(2, 3, 0, stretch=40) == 2  # without the rule the clock alone ends it


# ---------------------------------------------------------------------------------------------
# Auto's decisions


@pytest.mark.parametrize("costs", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("shape", ["flat 0.8", "decaying", "flat 0.98"])
def test_auto_picks_the_best_expected_rate(costs, shape):
    acceptance = {
        "flat 0.8": [0.8] * MAX_DRAFT,
        "decaying": [0.95 * 0.85**j for j in range(MAX_DRAFT)],
        "flat 0.98": [0.98] * MAX_DRAFT,
    }[shape]
    rates = [expected_rate(costs, acceptance, k) for k in range(MAX_DRAFT + 1)]
    for limit in (MAX_DRAFT, 3, 1, 0):  # never past what is left to generate
        policy = Auto(costs, dataclasses.replace(STEADY, **DRAFTED))
        teach(policy, acceptance)
        best = int(np.argmax(rates[: limit + 1]))
        if best or not limit:
            assert policy.choose(limit, [0]) == best
        else:  # plain pays (the CPU's shape): the first choice probes, then plain steps
            assert policy.choose(limit, [0]) == 1 + int(np.argmax(rates[1 : limit + 1]))
            assert [policy.choose(limit, [0]) for _ in range(16)] == [0] * 16


def test_auto_sums_the_rows_of_a_batch():
    """One k for the batch: the best for the sum of its rows' expected tokens, here between what
    its good row and its bad row would choose alone."""
    policy = Auto(GPU, STEADY)
    good, bad = [0.9] * MAX_DRAFT, [0.35] * MAX_DRAFT
    teach(policy, good, rows=(0,))
    teach(policy, bad, rows=(1,))
    alone = [int(np.argmax([expected_rate(GPU, a, k) for k in range(MAX_DRAFT + 1)])) for a in (good, bad)]
    both = [
        (expected_rate(GPU, good, k, 2) + expected_rate(GPU, bad, k, 2)) / 2 for k in range(MAX_DRAFT + 1)
    ]
    k = policy.choose(MAX_DRAFT, [0, 1])
    assert k == int(np.argmax(both)) and alone[1] < k < alone[0]


def test_auto_decodes_a_compute_bound_batch_plainly():
    """Where a verify costs about its rows x tokens (large B), drafting stops paying: the batch
    decodes plainly though every row's drafts are mostly kept."""
    batches = (1, 16)
    verify = tuple(tuple(8e-3 + 2e-3 * b * (k + 1) for k in range(MAX_DRAFT + 1)) for b in batches)
    costs, rows = Costs(batches=batches, verify=verify, draft=(5e-4, 5e-4)), list(range(16))
    policy = Auto(costs)
    teach(policy, [0.7] * MAX_DRAFT, rounds=200, rows=rows)
    assert max(
        expected_rate(costs, [0.7] * MAX_DRAFT, k, 16) for k in range(1, MAX_DRAFT + 1)
    ) < 16 / costs.plain(16)
    assert policy.choose(MAX_DRAFT, [0]) > 0  # one row drafts ...
    assert [policy.choose(MAX_DRAFT, rows) for _ in range(16)] == [0] * 16  # ... sixteen do not


def test_auto_with_a_useless_drafter_decodes_plainly_and_probes():
    """Nothing is ever kept: after the opening rounds (drafting pays until the prior's 1/2 has
    fallen below the break-even), plain steps, and a probe after 2 (the opening is thin evidence),
    then one each time enough plain steps have passed that it costs 0.5% of them."""
    chosen = useless_drafter_choices(Auto(GPU, DRAFTING), GPU, 1000)
    drafted = [i for i, k in enumerate(chosen) if k]
    opening = next(i for i, k in enumerate(chosen) if not k)
    # A round costs 1.15 plain steps: drafting pays while a_1 > 0.15, i.e. 1 / (2 + n) after n rounds.
    assert opening == 5 and drafted[:opening] == list(range(opening))
    stretch = math.ceil((GPU.round(1) / GPU.plain() - 1) / Rules().probe_share)
    gaps = [b - a - 1 for a, b in itertools.pairwise(drafted[opening - 1 :])]
    assert gaps == [2] + [stretch] * (len(gaps) - 1) and len(gaps) > 20


def shadowed_choices(policy, steps: int, kept) -> list[str]:
    """Auto's choices at B = 1 as "k", "shadow" or "plain", each told at once: a drafting round
    or a shadow keeps `kept(step)` of its drafts (a shadow: of one)."""
    chosen = []
    for step in range(steps):
        k = policy.choose(1000, [0])
        shadow = not k and policy.shadow()
        chosen.append(str(k) if k else "shadow" if shadow else "plain")
        if k or shadow:
            policy.observe(k or 1, {0: min(kept(step), k or 1)})
        if not shadow:
            policy.observe_time(k, 1, GPU.round(k))
    return chosen


def test_auto_tells_a_useless_drafter_by_shadows_after_one_round():
    """Nothing is ever kept: one drafting round (on the prior), then shadows where the rates would
    draft again (a shadow costs a drafter step, a round a verify of two tokens), then a shadow
    probe each time enough plain steps have passed that its drafter step costs 0.5% of them. A
    shadow that keeps its draft brings drafting rounds back."""
    chosen = shadowed_choices(Auto(GPU), 1000, kept=lambda step: 0)
    assert chosen[0] != "plain" and chosen[0] != "shadow"
    assert all(c in ("plain", "shadow") for c in chosen[1:])
    shadows = [i for i, c in enumerate(chosen) if c == "shadow"]
    stretch = max(Rules().probe_first, math.ceil(GPU.drafter() / GPU.plain() / Rules().probe_share))
    gaps = [b - a - 1 for a, b in itertools.pairwise(shadows)]
    assert gaps[-10:] == [stretch] * 10 and len(shadows) > 1000 / (stretch + 1) - 2
    assert sum(c == "shadow" for c in chosen[:8]) >= 2  # the opening asks the drafter cheaply
    comes_back = shadowed_choices(Auto(GPU), 300, kept=lambda step: 0 if step < 100 else 16)
    assert any(c not in ("plain", "shadow") for c in comes_back[100:150])
    assert sum(c not in ("plain", "shadow") for c in comes_back[150:]) > 100


def test_auto_learns_what_rounds_really_cost():
    """Measured costs say drafting pays at this acceptance; the clock says rounds take twice as
    long: auto turns to plain decoding."""
    costs = one_row([1.0] + [1.1 + 0.02 * k for k in range(1, MAX_DRAFT + 1)], 0.05)
    acceptance = [0.5] + [0.0] * (MAX_DRAFT - 1)
    naive, timed = Auto(costs), Auto(costs)
    for policy in (naive, timed):
        teach(policy, acceptance, rounds=100)
    for k in range(MAX_DRAFT + 1):
        timed.observe_time(k, 1, costs.round(k) * (2 if k else 1))
    assert naive.choose(MAX_DRAFT, [0]) > 0 and np.argmax(naive.rates(MAX_DRAFT, [0])) > 0
    assert np.argmax(timed.rates(MAX_DRAFT, [0])) == 0


def test_auto_learns_each_draft_lengths_own_cost():
    """The measured curve is flat, but in the loop every verify of 10 or more tokens takes a
    slow path (as MLX CUDA's quantized verify of 2-7 rows does): auto settles below it, and
    a single hiccup (a kernel compiling) does not throw it off."""
    costs = one_row((1.0,) + (1.2,) * MAX_DRAFT, 0.02)
    policy, chosen = Auto(costs), []
    for i in range(80):
        k = policy.choose(100, [0])
        chosen.append(k)
        if k == 0:
            policy.observe_time(0, 1, costs.plain())
            continue
        policy.observe(k, {0: k})  # every draft kept
        slow = 10 if k >= 9 else 1
        policy.observe_time(k, 1, costs.round(k) * slow * (50 if i == 60 else 1))
    assert 1 <= chosen[-1] <= 8 and all(k <= 8 for k in chosen[-15:]), chosen


def test_auto_follows_a_change_of_acceptance():
    """The drafter goes bad mid-generation (from prose to a table of numbers), then good."""
    policy = Auto(GPU, DRAFTING)
    teach(policy, [0.9] * MAX_DRAFT, rounds=50)
    assert policy.choose(100, [0]) > 5
    for _ in range(100):
        policy.observe(policy.choose(100, [0]) or 1, {0: 0})
    assert policy.choose(100, [0]) == 0
    k, rounds = 0, 0
    while k <= 5 and rounds < 2000:
        k = policy.choose(100, [0])
        if k:
            policy.observe(k, {0: k})  # good again
        rounds += 1
    assert k > 5 and rounds <= 300, "slow to draft again (its next probe)"


def test_a_round_read_back_during_a_plain_stretch_is_weighed():
    """The loop asks one round ahead: a good round read back after the choice that began a
    plain stretch (made without it) resumes drafting at once."""
    policy = Auto(GPU, DRAFTING)
    teach(policy, [0.0] * MAX_DRAFT, rounds=10)
    assert policy.choose(100, [0]) > 0 and policy.choose(100, [0]) == 0  # a probe, then the stretch
    for _ in range(2):
        policy.observe(8, {0: 8})  # rounds queued before that choice, all kept
    assert policy.choose(100, [0]) > 0


def test_auto_decodes_plainly_until_its_first_round_is_seen():
    """The loop asks one round ahead: the choice after the first drafting round knows nothing
    the first did not, so it is a plain step (a second guess would cost a useless drafter two
    rounds); from the first observation on, auto chooses as before."""
    policy = Auto(GPU)
    first = policy.choose(100, [0])
    assert first > 0 and [policy.choose(100, [0]) for _ in range(3)] == [0, 0, 0]
    policy.observe(first, {0: first})  # all kept
    assert policy.choose(100, [0]) > 0 and policy.choose(100, [0]) > 0  # now one round ahead


def test_no_round_is_believed_cheaper_than_a_plain_step_and_its_drafts():
    """Noisy timings say a one-draft round is cheaper than a plain step: with nothing ever kept
    drafting cannot pay, and auto decodes plainly (bar its probes)."""
    policy = Auto(GPU)
    teach(policy, [0.0] * MAX_DRAFT, rounds=200)
    for _ in range(3):
        policy.observe_time(0, 1, 2.0)
        policy.observe_time(1, 1, 1.0)
    assert policy.cost.seconds(1, 1) == pytest.approx(2.0 + GPU.drafter())
    chosen = [policy.choose(100, [0]) for _ in range(64)]
    assert sum(k > 0 for k in chosen) <= 64 // 16, chosen  # its probes, no more


def test_a_useless_drafters_probes_are_spaced_by_what_they_really_cost():
    """A host-bound loop's interval before a probe's read-back is the host building the plain
    step after it: the probe looks as cheap as a plain step, and probes come every ~20 rounds.
    Timed by its own share (1.6 plain steps), a probe costs 0.6 of a plain step, and auto spaces
    them so that they cost it `probe_share` (0.5%): every ~120 rounds."""
    spacing = {}
    for own_share in (True, False):
        policy = Auto(GPU, Rules(own_share=own_share, **DRAFTED))
        chosen = []
        for _ in range(1200):
            chosen.append(policy.choose(1000, [0]))
            if chosen[-1]:
                policy.observe(chosen[-1], {0: 0})
            policy.observe_time(chosen[-1], 1, 1.0, own=1.6 if chosen[-1] else 1.0)
        if own_share:
            assert policy.cost.seconds(1, 1) == pytest.approx(1.6)
        probes = [i for i, k in enumerate(chosen) if k][3:]  # after the opening's
        spacing[own_share] = (probes[-1] - probes[0]) / (len(probes) - 1)
    assert spacing[True] >= 100 and spacing[False] <= 30, spacing


def test_rounds_timed_dear_say_nothing_of_an_untimed_plain_step():
    """A generation opens with rounds, and a plain step behind a drafting round is not timed.
    Rounds timed at twice their measurement must not make plain decoding look twice as dear
    (drafting would keep its measured price against it): auto turns to plain decoding."""
    costs = one_row((1.0,) + (1.15,) * MAX_DRAFT, 0.03)
    policy = Auto(costs, DRAFTING)
    first = policy.choose(100, [0])
    policy.observe(first, {0: 0})  # read back, not timed (queued into an empty pipeline)
    second, third = policy.choose(100, [0]), policy.choose(100, [0])
    assert second > 0 and third > 0  # a_1 = 1/3 and rounds measured at 1.15 plain steps: worth a try
    policy.observe(second, {0: 0})
    policy.observe_time(second, 1, 2.0 * costs.round(second))
    assert policy.cost.seconds(0, 1) == costs.plain()
    chosen = [policy.choose(100, [0]) for _ in range(3)]
    assert chosen[:2] == [0, 0] and chosen[2] > 0  # on thin evidence a probe after 2 plain steps
    policy.observe(chosen[2], {0: 0})
    assert [policy.choose(100, [0]) for _ in range(16)] == [0] * 16


def test_probes_draft_the_cheapest_round_and_come_soon_after_a_kept_draft():
    """A probe is there to learn: it drafts the cheapest round (on the 31B's slow path, one
    draft). While the evidence is thin, a probe that kept a draft brings the next one within 16
    plain rounds (one kept draft is worth another look); with evidence it is the stretch's."""
    policy = Auto(SLOW_SHORT, DRAFTING)
    assert policy.choose(100, [0]) == 1  # nothing seen: plain pays at the prior, so a probe
    policy.observe(1, {0: 0})
    chosen = [policy.choose(100, [0]) for _ in range(3)]
    assert chosen == [0] * 2 + [1]  # thin evidence: a short wait, then a probe of the cheapest round
    policy.observe(1, {0: 1})  # it kept its draft: not enough to draft on (a_1 = 1/2) ...
    chosen = [policy.choose(100, [0]) for _ in range(17)]
    assert chosen == [0] * 16 + [1]  # ... but the next probe comes after 16, not the stretch
    policy.observe(1, {0: 0})
    stretch = math.ceil((SLOW_SHORT.round(1) - 1) / Rules().probe_share)  # 1.55 / 0.5%: 311
    chosen = [policy.choose(100, [0]) for _ in range(stretch + 1)]
    assert chosen == [0] * stretch + [1]
    sure = Auto(SLOW_SHORT, DRAFTING)
    teach(sure, [0.5] + [0.0] * (MAX_DRAFT - 1), rounds=40)  # the same a_1, on evidence
    assert sure.choose(100, [0]) == 1
    sure.observe(1, {0: 0})
    assert [sure.choose(100, [0]) for _ in range(17)] == [0] * 16 + [1]
    sure.observe(1, {0: 1})  # the second probe kept its draft
    assert [sure.choose(100, [0]) for _ in range(40)] == [0] * 40  # the stretch goes on


def test_a_failed_first_round_is_thin_evidence():
    """At high acceptance one first round in five keeps nothing. On a flat cost curve (E2B bf16 on
    the H100, r42: a verify costs ~1.55 plain steps) that alone makes plain decoding pay, but one
    round says little: a probe after 2 plain rounds, not 16, and drafting resumes once it keeps."""
    flat = one_row((1.0,) + (1.55,) * MAX_DRAFT, 0.07)
    policy = Auto(flat, DRAFTING)
    first = policy.choose(100, [0])
    assert first > 1  # the prior's 1/2 pays on this curve
    policy.observe(first, {0: 0})
    chosen = [policy.choose(100, [0]) for _ in range(3)]
    assert chosen[:2] == [0, 0] and chosen[2] > 0
    policy.observe(chosen[2], {0: chosen[2]})  # kept
    assert policy.choose(100, [0]) > 0
    patient = Auto(flat, Rules(thin_wait=Rules().probe_first, **DRAFTED))  # as a stretch after drafting paid
    patient.observe(patient.choose(100, [0]), {0: 0})
    assert [patient.choose(100, [0]) for _ in range(16)] == [0] * 16


def test_a_row_that_left_still_counts_among_the_others():
    """A new row starts from the rows before it, those that left included (a chat's next turn, a
    server's next request): forgetting them started every new conversation from the prior, and a
    lone row's next conversation decoded plainly until a probe (docs/auto.md, "in turn").
    `remember_left` off: only the rows present count."""
    policy, forgetful = Auto(GPU, STEADY), Auto(GPU, dataclasses.replace(STEADY, remember_left=False))
    for p in (policy, forgetful):
        teach(p, [0.95] * MAX_DRAFT, rows=(0,))
        teach(p, [0.0] * MAX_DRAFT, rows=(1,))
    between = policy.rates(4, [2])[4]
    assert policy.rates(4, [1])[4] < between < policy.rates(4, [0])[4]  # a new row: between the two
    policy.forget(0)
    forgetful.forget(0)
    assert policy.rates(4, [2])[4] == pytest.approx(between)  # row 0's rounds still count
    assert forgetful.rates(4, [2]) == pytest.approx(forgetful.rates(4, [1]), rel=0.02)  # only row 1's


def test_plain_for_want_of_room_is_no_verdict_on_drafting():
    """Near its end a row has room for one draft, and one draft does not pay on this curve (a
    verify costs 2 plain steps) though eight do: that round is plain, and the next conversation
    drafts at once. Taken as a verdict it began a plain stretch the next row inherited."""
    steep_start = one_row((1.0,) + (2.0,) * MAX_DRAFT, 0.05)
    for rules, drafts_next in ((STEADY, True), (dataclasses.replace(STEADY, room_no_verdict=False), False)):
        policy = Auto(steep_start, rules)
        teach(policy, [0.95] * MAX_DRAFT, rows=(0,))
        assert policy.choose(100, [0]) > 1
        assert policy.choose(1, [0]) == 0  # one draft of room: a plain step pays more
        policy.forget(0)
        assert (policy.choose(100, [1]) > 0) is drafts_next, rules


# ---------------------------------------------------------------------------------------------
# The loop-faithful simulation (bench/simulate.py)


class Recording:
    """Plays `moves` forever on the batched interface, noting what the loop tells it."""

    def __init__(self, moves):
        self.moves, self.chosen, self.seen, self.timed, self.observed = itertools.cycle(moves), [], [], [], 0
        self.owns = []  # the own share told with each timing

    def choose(self, limit, rows):
        self.seen.append(self.observed)
        self.chosen.append(min(next(self.moves), limit))
        return self.chosen[-1]

    def observe(self, k, accepted):
        self.observed += 1

    def observe_time(self, k, batch, seconds, own=None):
        self.timed.append((k, seconds))
        self.owns.append(own)

    def forget(self, row):
        """Nothing kept per row."""

    def shadow(self):
        return False


def test_the_simulated_loop_chooses_one_round_ahead_and_times_as_the_loop_does():
    """Choice c is made with rounds 0..c-2 read back; a round is timed when it ran behind
    another with another behind it, except a plain step behind a drafting round; its time is
    what it cost the device."""
    case = simulate.Case("E2B bf16", 1, "α 0.8")
    true = simulate.truth(case.shape)
    policy = Recording([2, 0, 0, 0, 5, 3])
    simulate.Loop(case, true, simulate.Card(simulate.QUIET, 0), seed=0).run(policy)
    drafting = [k > 0 for k in policy.chosen]
    assert policy.seen[:30] == [sum(drafting[: max(c - 1, 0)]) for c in range(30)]
    chosen = policy.chosen
    timed = [k for r, k in enumerate(chosen) if r and (k or not chosen[r - 1])]
    assert [k for k, _ in policy.timed[:20]] == timed[:20]
    assert all(s == pytest.approx(true.round(k)) for k, s in policy.timed)


def test_a_host_bound_loop_times_the_host_building_the_next_round():
    """Where the host bounds the rounds (device share < 1), the clock reads, between two
    read-backs, the host building the round queued between them: a round is timed at the cost of
    the round after it, as the engine's clock is where its read-backs never wait (E2B, r47); the
    run takes the host's time, every round's cost one after another."""
    case = simulate.Case("E2B bf16", 1, "α 0.8", device=0.4)
    true = simulate.truth(case.shape)
    moves = [1, 0, 0, 2, 0]
    assert all(0.4 * true.round(k) < true.round(j) for k in moves for j in moves)  # the device keeps up
    policy = Recording(moves)
    seconds = simulate.Loop(case, true, simulate.Card(simulate.QUIET, 0), seed=0).run(policy)
    chosen = policy.chosen
    timed = [(k, chosen[r + 1]) for r, k in enumerate(chosen[:-1]) if r and (k or not chosen[r - 1])]
    assert [k for k, _ in policy.timed[:20]] == [k for k, _ in timed[:20]]
    assert all(s == pytest.approx(true.round(after)) for (_, s), (_, after) in zip(policy.timed[:20], timed))
    assert seconds == pytest.approx(sum(true.round(k) for k in chosen), rel=0.02)
    assert "host-bound" in case.name and "host-bound" not in simulate.Case("E2B bf16", 1, "α 0.8").name
    # A round's own share is its own cost (the host building it; its read-back never waits).
    assert all(own == pytest.approx(true.round(k)) for (k, _), own in zip(policy.timed, policy.owns))


def test_turning_between_plain_steps_and_drafting_costs_the_host_more():
    """`Case.switch` (r49's churn): a round drafting after a plain step costs 0.3 of a plain
    step more, a plain step after a drafting round 0.1 more; its own share shows it where the
    interval before its read-back does not."""
    plain_case = simulate.Case("E2B bf16", 1, "α 0.8", device=0.4)
    case = dataclasses.replace(plain_case, switch=(0.3, 0.1))
    true = simulate.truth(case.shape)
    moves = [1, 0, 0, 2, 2, 0]
    policies = {c: Recording(moves) for c in (plain_case, case)}
    seconds = {
        c: simulate.Loop(c, true, simulate.Card(simulate.QUIET, 0), seed=0).run(p)
        for c, p in policies.items()
    }
    policy, chosen = policies[case], policies[case].chosen
    into = [k > 0 for r, k in enumerate(chosen) if r and (k > 0) != (chosen[r - 1] > 0)]
    extra = sum(0.3 if drafting else 0.1 for drafting in into) * true.plain()
    assert seconds[case] == pytest.approx(seconds[plain_case] + extra, rel=0.02)
    timed_rounds = [r for r, k in enumerate(chosen[:-1]) if r and (k or not chosen[r - 1])]
    for r, own in zip(timed_rounds[:20], policy.owns):
        k, before = chosen[r], chosen[r - 1]
        turn = 0.3 if k and not before else 0.1 if before and not k else 0.0
        assert own == pytest.approx(true.round(k) + turn * true.plain())
    assert "switch +0.3/+0.1" in case.name


def test_the_simulation_adds_every_shape_on_a_host_bound_card_with_a_given_switch_cost():
    """`--switch IN OUT` adds each shape's α 0, α 0.8 and 26B-profile cases at every batch size it
    has, host-bound and turning at that cost; a negative cost is refused, naming the flag."""
    plain = simulate.cases((1, 4))
    added = [c for c in simulate.cases((1, 4), switch=(0.6, 0.1)) if c not in plain]
    shapes = (*simulate.SURFACE, simulate.COMPUTE_BOUND, *simulate.BENCH)
    assert sorted((c.shape, c.batch, c.acceptance) for c in added) == sorted(
        (shape, b, a)
        for shape in shapes
        for b in (1, 4)
        if b <= simulate.truth(shape).batches[-1]
        for a in ("α 0", "α 0.8", "26B profile")
    )
    assert all(c.switch == (0.6, 0.1) and c.device == simulate.HOST_BOUND_DEVICE for c in added)
    assert all("switch +0.6/+0.1" in c.name for c in added)
    with pytest.raises(SystemExit):
        simulate.main(["--switch", "-1", "0"])


def test_served_rows_join_later_and_their_rounds_go_untimed():
    """The server's regime: a row that ends is replaced `served` rounds later, and a round that
    runs a joining row's prefill costs that much more and is not timed; every timed round is a
    plain round of its batch."""
    case = simulate.Case("E2B bf16", 4, "α 0.8", tokens=12, served=2)
    true = simulate.truth(case.shape)

    class Batches(Recording):
        def choose(self, limit, rows):
            self.batches.append(len(rows))
            return super().choose(limit, rows)

        def observe_time(self, k, batch, seconds, own=None):
            self.timed.append((k, batch, seconds))

    policy = Batches([3])  # rows keep different numbers of drafts: they end apart
    policy.batches = []
    loop = simulate.Loop(case, true, simulate.Card(simulate.QUIET, 0), seed=0)
    loop.run(policy)
    assert loop.started > case.batch  # rows were replaced
    assert min(policy.batches) < case.batch and policy.batches[-1] <= case.batch  # ... after a gap
    gaps = [b for b in policy.batches if b < case.batch]
    assert len(gaps) >= case.served  # a gap lasts `served` rounds at least
    # A round with a prefill, timed, would read more than its own cost.
    assert policy.timed and all(s == pytest.approx(true.round(k, b)) for k, b, s in policy.timed)
    unserved = simulate.Case("E2B bf16", 4, "α 0.8", tokens=12)
    again = Batches([3])
    again.batches = []
    simulate.Loop(unserved, true, simulate.Card(simulate.QUIET, 0), seed=0).run(again)
    assert set(again.batches) == {case.batch}  # replaced at once


@pytest.mark.parametrize(
    "case, least",
    [
        (simulate.Case("E2B bf16", 1, "α 0"), ("plain", 0.975)),  # 12 generations: the table has 40
        (simulate.Case("compute-bound", 16, "α 0.8"), ("plain", 0.95)),
        (simulate.Case("31B 4-bit", 4, "α 0.8"), ("best fixed", 0.93)),
    ],
    ids=lambda x: x.name if isinstance(x, simulate.Case) else "",
)
def test_the_simulation_holds_auto_to_its_targets(case, least):
    """Auto at alpha = 0 against plain decoding, and at alpha = 0.8 against the best fixed k
    (chosen after the fact), on the same draws of the card's noise."""
    row = simulate.summary(case, simulate.simulate(case, 12, {}))
    against, bar = least
    assert row["auto"] / (1.0 if against == "plain" else row["best_fixed"]) >= bar, row


def test_the_simulation_reads_a_batch_that_starts_together_while_it_is_full():
    """As the batch benchmark does: seconds and tokens until the read-back in which a row first
    ended. Rows that end together: the whole run; a ragged batch: until its fast row's end."""
    true = simulate.truth("E2B bf16")
    together = simulate.Case("E2B bf16", 2, "α 0", tokens=12, queue=False)
    loop = simulate.Loop(together, true, simulate.Card(simulate.QUIET, 0), seed=0)
    seconds = loop.run(Fixed(0))
    assert loop.full == (seconds, 2 * 11)
    ragged = simulate.Case("E2B bf16", 2, "ragged", tokens=64, queue=False)
    loop = simulate.Loop(ragged, true, simulate.Card(simulate.QUIET, 0), seed=0)
    seconds = loop.run(Fixed(4))
    # A quiet card: every round its true cost, the first queued into an idle pipeline after the host's.
    rounds = round(loop.full[0] / true.round(4, 2))
    assert (
        loop.full[0] == pytest.approx(rounds * true.round(4, 2) + simulate.QUIET.host)
        and loop.full[0] < seconds
    )
    assert 63 + rounds <= loop.full[1] < 2 * 63  # the 0.9 row's every token, the 0.2 row's some
    row = simulate.summary(ragged, simulate.simulate(ragged, 2, {}))
    assert (
        row["best_fixed_full"] > row["best_fixed"] and 0 < row["auto_full"] <= row["best_fixed_full"] * 1.05
    )
    queued = simulate.Case("E2B bf16", 2, "α 0.8", tokens=16)  # rows replaced: never "full" to the end
    assert "auto_full" not in simulate.summary(queued, simulate.simulate(queued, 1, {}))
    assert "while full" in simulate.table(
        [row], rules=False
    ) and f"(k={row['best_k_full']})" in simulate.table([row], False)


def test_quiet_rounds_spread_a_k_s_timings_as_little_as_the_card_s_own_share_clock():
    """`--quiet-rounds`: a fixed k's timings within a generation spread (sd of their log) as r53's
    did on the H100 (0.005-0.05), where the default card's spread ~0.15; the rest is the card's."""
    parse = simulate.setup_arg_parser().parse_args
    quiet, default = simulate.noise_of(parse(["--quiet-rounds", "--opening"])), simulate.noise_of(parse([]))
    assert quiet.opening == simulate.OPENING and quiet.level == default.level and default.jitter == 0.15

    class Timings(Fixed):
        def observe_time(self, k, batch, seconds, own=None):
            self.seen.append(math.log(seconds))

    def spread(noise):
        policy = Timings(8)
        policy.seen = []
        case = simulate.Case("E2B bf16", 4, "α 0.8", tokens=256, queue=False)
        simulate.Loop(case, simulate.truth(case.shape), simulate.Card(noise, seed=1), seed=1).run(policy)
        clean = sorted(policy.seen)[: int(0.95 * len(policy.seen))]  # hiccups aside
        return float(np.std(clean))

    assert spread(quiet) < 0.06 and spread(default) > 0.1


def test_a_plain_stretch_skips_the_rates_and_chooses_as_it_would_with_them(monkeypatch):
    """In a plain stretch no kept draft has ended, auto goes on plainly without computing the
    rates (host time every round of a useless drafter: ~0.1 ms at B = 8), and every choice is the
    one it makes computing them: the simulated loops take the same seconds with the shortcut off."""
    taken = []
    waiting = Probes.waiting
    monkeypatch.setattr(Probes, "waiting", lambda self, kept: taken.append(waiting(self, kept)) or taken[-1])

    def seconds(case: simulate.Case) -> list[float]:
        true, out = simulate.truth(case.shape), []
        for g in range(3):
            policy = Auto(simulate.measured(true, simulate.Noise(), seed=10**6 + g))
            out.append(simulate.Loop(case, true, simulate.Card(simulate.Noise(), seed=g), seed=g).run(policy))
        return out

    for case in (
        simulate.Case("E2B bf16 r46", 4, "α 0"),
        simulate.Case("E2B bf16 r46", 4, "switching"),
        simulate.Case("E2B bf16", 16, "α 0", served=1),
    ):
        taken.clear()
        with_shortcut = seconds(case)
        assert sum(taken) > 10, case.name  # the shortcut was taken
        with monkeypatch.context() as off:
            off.setattr(Probes, "waiting", lambda self, kept: False)
            assert seconds(case) == with_shortcut, case.name


def test_the_rules_summary_counts_gains_and_losses_per_rule():
    rows = [
        {"case": "a", "gains": {"x": (0.05, 0.01), "y": (-0.02, 0.02)}},
        {"case": "b", "gains": {"x": (0.02, 0.02), "y": (0.003, 0.001)}},
        {"case": "c", "gains": {"x": (-0.03, 0.01), "y": (-0.015, 0.005)}},
    ]
    lines = simulate.rule_summary(rows).splitlines()
    assert lines[2] == "| x | 2 (1) | +5.0% (a) | 1 (1) | -3.0% (c) |"
    assert lines[3] == "| y | 0 (0) | +0.3% (b) | 2 (1) | -2.0% (a) |"
