"""The engine running whatever a policy chooses, and the costs `auto` reads: measured by the
engine's own clock per batch size, kept on disk, calibrated up front by a command."""

from __future__ import annotations

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp import costs as costs_module
from mlx_gemma_mtp import engine as engine_module
from mlx_gemma_mtp import load, load_drafter, stream_generate
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.draft_length import MAX_DRAFT, Auto, Costs, Rules
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.load import load_target
from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.speculative import drafter_proposer
from tests.run import decode, prompts, scripted


class Script:
    """A policy playing `moves` forever, whatever the rows."""

    def __init__(self, moves):
        self.moves = itertools.cycle(moves)

    def choose(self, limit, rows):
        return min(next(self.moves), limit)

    def observe(self, k, accepted):
        """A script does not adapt."""

    def observe_time(self, k, batch, seconds, own=None):
        """... to acceptance or to timing."""

    def forget(self, row):
        """... or to rows."""

    def shadow(self):
        return False


MOVES = [3, *[0] * 5, 7, 0, 1, *[0] * 12, 16, 2, 0, 0]  # 0: one plain step


@pytest.fixture(scope="module")
def dense(loaded):
    return loaded["dense"]


def test_every_move_is_exact_and_drafts_from_the_right_token(dense):
    """Plain stretches between drafting rounds of every size, for a batch of two: still each
    row's plain greedy output, and every round drafts from each row's right token and hidden
    state (a round queued behind an unread one included)."""
    target, drafter = dense
    batch, n = prompts(0, [30, 17]), 120
    plain = [decode(target, None, [p], 0, n)[0].tokens for p in batch]
    propose, seen = drafter_proposer(drafter, target), []

    def recording(rows, k):
        seen.append((list(rows.ids), rows.token, rows.hidden, rows.cache.positions.offset))
        return propose(rows, k)

    out = decode(target, drafter, batch, Script(MOVES), n, propose=recording)
    assert [o.tokens for o in out] == plain
    assert all(out[0].usage.draft_lengths[k] for k in set(MOVES)) and out[0].usage.accepted > 0
    sequences = [p + t for p, t in zip(batch, plain)]
    hidden = [target(mx.array([s]), target.make_cache())[0] for s in sequences]  # [len, H] each
    for ids, tokens, states, positions in seen:
        for b, rid in enumerate(ids):
            position = positions[b].item()
            assert tokens[b, 0].item() == sequences[rid][position]
            assert np.allclose(np.array(states[b, 0]), np.array(hidden[rid][position - 1]), atol=1e-4)


def test_every_move_samples_with_one_token_left(dense):
    """Sampling through the same moves, with top_k = 1 (p a point mass): the greedy output."""
    target, drafter = dense
    prompt, n = prompts(1, [30])[0], 80
    plain = decode(target, None, [prompt], 0, n)[0].tokens
    sampled = make_sampling(temperature=1.0, top_k=1, seed=0)
    assert decode(target, drafter, [prompt], Script(MOVES), n, sampling=sampled)[0].tokens == plain


@pytest.mark.parametrize("schedule", ["auto", "heuristic"])
def test_stream_generate_schedules(schedule, checkpoints, random_checkpoints):
    """Through the public API, with an agreeing and a useless drafter: exact, and the last
    response's statistics add up."""
    for pair in (checkpoints, random_checkpoints):
        model, tokenizer = load(pair["e2b"][0])
        drafter = load_drafter(pair["e2b"][1], model)
        prompt = prompts(2, [30])[0]
        plain = [r.token for r in stream_generate(model, tokenizer, prompt, 60)]
        out = list(
            stream_generate(model, tokenizer, prompt, 60, draft_model=drafter, num_draft_tokens=schedule)
        )
        assert [r.token for r in out] == plain
        last = out[-1]
        histogram = last.draft_lengths
        rounds = sum(histogram[1:])
        assert len(histogram) == MAX_DRAFT + 1
        assert sum(k * histogram[k] for k in range(MAX_DRAFT + 1)) == last.drafted
        assert last.acceptance_rate == pytest.approx(last.accepted / max(last.drafted, 1))
        assert last.mean_accepted == pytest.approx(last.accepted / rounds if rounds else 0.0)
        if last.finish_reason == "length":  # every token accounted for: the first, rounds, plain steps
            assert last.generation_tokens == 1 + last.accepted + rounds + histogram[0]


# ---------------------------------------------------------------------------------------------
# Costs on disk


def test_costs_are_measured_once_per_batch_size_and_kept(dense, tmp_path, monkeypatch, capsys):
    target, drafter = dense
    monkeypatch.setattr(costs_module, "REPEATS", 1)  # (fewer passes: what is kept is the point here)
    first = costs_module.load_costs(target, drafter, (1, 2), tmp_path)
    assert first.batches == (1, 2) and all(len(row) == MAX_DRAFT + 1 for row in first.verify)
    assert all(t > 0 for row in first.verify for t in row) and all(d > 0 for d in first.draft)
    err = capsys.readouterr().err
    assert "Measuring this device's drafting costs once (batch sizes 1, 2)" in err and "calibrate" in err
    [path] = tmp_path.glob("costs-*.json")
    saved = json.loads(path.read_text())
    assert saved["mlx"] == mx.__version__ and "cpu" in saved["device"].lower()
    assert set(saved["batches"]) == {"1", "2"} and all(e["seconds"] > 0 for e in saved["batches"].values())

    measured = []

    def measure(target, drafter, batch, progress):
        measured.append(batch)
        return {"verify": [0.01] * (MAX_DRAFT + 1), "draft": 0.001}

    monkeypatch.setattr(costs_module, "measure_costs", measure)
    assert costs_module.load_costs(target, drafter, (1, 2), tmp_path) == first and measured == []
    both = costs_module.load_costs(target, drafter, (1, 2, 4), tmp_path)  # only the new size is measured
    assert measured == [4] and both.batches == (1, 2, 4) and both.verify[:2] == first.verify
    kept = json.loads(path.read_text())["batches"]  # what measuring took stays with what it measured
    assert [kept[b]["seconds"] for b in ("1", "2")] == [saved["batches"][b]["seconds"] for b in ("1", "2")]
    path.write_text("{")  # a damaged file (a write cut short) is measured again
    costs_module.load_costs(target, drafter, (1,), tmp_path)
    assert measured == [4, 1]


def test_a_calibration_cut_short_keeps_the_batch_sizes_it_finished(dense, tmp_path, monkeypatch):
    target, drafter = dense
    measured, cut = [], [4]

    def measure(target, drafter, batch, progress):
        if batch in cut:
            raise KeyboardInterrupt  # Ctrl-C, or a time limit, while the third size is measured
        measured.append(batch)
        return {"verify": [0.01 * batch] * (MAX_DRAFT + 1), "draft": 0.001, "seconds": 1.0}

    monkeypatch.setattr(costs_module, "measure_costs", measure)
    quiet = lambda done, of: None
    with pytest.raises(KeyboardInterrupt):
        costs_module.load_costs(target, drafter, (1, 2, 4), tmp_path, progress=quiet)
    [path] = tmp_path.glob("costs-*.json")
    assert set(json.loads(path.read_text())["batches"]) == {"1", "2"}
    cut.clear()  # run again: only the size cut short is measured
    again = costs_module.load_costs(target, drafter, (1, 2, 4), tmp_path, progress=quiet)
    assert measured == [1, 2, 4] and [row[0] for row in again.verify] == [0.01, 0.02, 0.04]


def test_costs_are_what_the_engines_clock_says(dense, monkeypatch):
    """Every k = 0..MAX_DRAFT runs in the engine itself (a warm-up pass, then REPEATS passes) at
    the batch size asked and costs the median of what its clock reported; verify[k] is a round
    less its drafter steps, at least a plain step."""
    target, drafter = dense
    scratch = costs_module._scratch(target, 2)
    timed = costs_module._loop_times(target, drafter, scratch, 3, 2)  # the real engine, k = 3, B = 2
    assert len(timed) == 2 and all(t > 0 for t in timed)

    runs = []

    def loop_times(target, drafter, prompts, k, rounds):
        runs.append((len(prompts), k))
        return [0.010 + 0.002 * k + 0.001 * i for i in range(rounds)]  # median: + 0.001

    monkeypatch.setattr(costs_module, "_loop_times", loop_times)
    monkeypatch.setattr(costs_module, "_drafter_step", lambda *_: 0.0015)
    measured = costs_module.measure_costs(target, drafter, batch=2)
    assert sorted(runs) == sorted([(2, k) for k in range(MAX_DRAFT + 1)] * (costs_module.REPEATS + 1))
    assert measured["draft"] == 0.0015
    for k in range(MAX_DRAFT + 1):
        assert measured["verify"][k] == pytest.approx(max(0.011 + 0.002 * k - 0.0015 * k, 0.011))


def test_calibration_prefills_each_scratch_row_once(dense, monkeypatch):
    """Every timing hands its rows' prefilled caches to the engine, which rewinds them to the
    prompt: it prefills the last id of each row's prompt, never the prompt again, and copies
    none; the rows' outputs are what fresh caches give, timing after timing."""
    target, drafter = dense
    monkeypatch.setattr(costs_module, "REPEATS", 1)
    prompts = [costs_module._scratch_prompt(target, row) for row in range(2)]
    fresh = [out.tokens for out in decode(target, drafter, prompts, 3, 6)]
    written = []
    real = engine_module.prefill

    def counted(model, tokens, cache, *args):
        written.append(len(tokens))
        return real(model, tokens, cache, *args)

    monkeypatch.setattr(engine_module, "prefill", counted)
    monkeypatch.setattr(costs_module, "prefill", counted)
    scratch = costs_module._scratch(target, 2)
    assert written == [len(prompts[0]) - 1, len(prompts[1]) - 1] and len(prompts[0]) > 8
    for _ in range(2):  # the second run starts from where the first left the caches
        engine = Engine(target, drafter, num_draft_tokens=3, max_batch=2)
        for prompt, kept in scratch:
            engine.add(Request(prompt=prompt, max_tokens=6, stop_ids=frozenset(), cache=kept))
        out = [[], []]
        while engine.busy:
            for event in engine.step():
                out[event.rid] += event.tokens
        assert out == fresh and scratch[0][1].tokens == prompts[0] + fresh[0][:-1]
    assert written[2:] == [1, 1, 1, 1]  # each run prefilled one id a row
    written.clear()
    costs_module.measure_costs(target, drafter, batch=2)
    assert written[:2] == [len(prompts[0]) - 1, len(prompts[1]) - 1]  # the scratch rows, once
    assert len(written) > 2 * (MAX_DRAFT + 1) and set(written[2:]) == {1}  # then one id a row a timing


def test_batch_sizes_measured_for_a_batch():
    assert costs_module.batch_sizes(1) == (1,)
    assert costs_module.batch_sizes(8) == (1, 2, 4, 8)
    assert costs_module.batch_sizes(6) == (1, 2, 4, 6)


def test_calibrate_measures_up_front_and_says_what(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(costs_module, "COST_DIR", tmp_path)
    monkeypatch.setattr(costs_module, "REPEATS", 1)
    argv = [
        "calibrate",
        str(checkpoints["dense"][0]),
        "--draft-model",
        str(checkpoints["dense"][1]),
        "--max-batch",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "batch   1: plain step" in out and "batch   2: plain step" in out and str(tmp_path) in out
    monkeypatch.setattr(costs_module, "measure_costs", lambda *a, **k: pytest.fail("measured again"))
    assert main(argv) == 0  # stored: read back


def test_calibrate_needs_a_drafter(checkpoints, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", str(checkpoints["dense"][0]), "--no-draft"])
    assert "it needs a drafter" in capsys.readouterr().err


def test_cost_key_ignores_what_changes_between_generations(dense, monkeypatch):
    """MLX CUDA's device_info reports free memory: the key must not follow it (every generation
    would measure again)."""
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


class Recorded:
    """An `Auto` told no timings (this CPU's clock would teach it a CPU's costs), noting each
    choice and the rows it was made for."""

    def __init__(self, policy):
        self.policy, self.choices = policy, []

    def choose(self, limit, rows):
        k = self.policy.choose(limit, rows)
        self.choices.append((tuple(rows), k))
        return k

    def observe(self, k, accepted):
        self.policy.observe(k, accepted)

    def observe_time(self, k, batch, seconds, own=None):
        """Not told."""

    def forget(self, row):
        self.policy.forget(row)

    def shadow(self):
        return self.policy.shadow()


def test_auto_drafts_from_the_start_of_the_next_conversation(dense):
    """One engine, one row at a time (a server's one client, a chat's turns): the second request
    drafts from its first choice, on what the first request's rounds showed. On this curve (a
    verify costs 3 plain steps, whatever its length) drafting pays at the first request's
    acceptance (every draft kept) but not at the prior's 1/2: with `remember_left` off the row
    that left took its counts with it, and the second request started plain (docs/auto.md,
    "Conversations in turn")."""
    target, drafter = dense
    batch, n = prompts(3, [20, 24]), 120
    plain = [decode(target, None, [p], 0, n)[0].tokens for p in batch]
    propose = scripted(plain, [len(p) for p in batch], [MAX_DRAFT])  # every draft right
    costs = Costs(verify=((1.0,) + (3.0,) * MAX_DRAFT,), draft=(0.01,))
    first = {}
    for name, rules in (("auto", Rules()), ("remember_left off", Rules(remember_left=False))):
        policy = Recorded(Auto(costs, rules))
        out = decode(target, drafter, batch, policy, n, max_batch=1, propose=propose)
        assert [o.tokens for o in out] == plain
        assert out[0].usage.accepted == out[0].usage.drafted >= n // 2  # the first learnt to draft
        first[name] = next(k for rows, k in policy.choices if rows == (1,))
    assert first["auto"] == MAX_DRAFT and first["remember_left off"] == 0, first
