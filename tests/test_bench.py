"""The benchmark's pipeline end to end on a tiny model (CPU): every part runs, replayed runs
reproduce plain decoding exactly (the CPU backend is batch-invariant), the replay controls
acceptance per row, the ideal comes from the run's own costs, and the old loop runs beside the
new one on the same weights."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bench
from bench import compare_loops, measure, peer, replay
from bench.models import build
from mlx_gemma_mtp.draft_length import MAX_DRAFT, Costs

TINY = ["--shapes", "tiny", "--bits", "bf16", "--context", "32", "--prompt", "16", "--tokens", "8",
        "--cost-trials", "2"]  # fmt: skip


@pytest.fixture
def known_costs(monkeypatch):
    """Auto from given costs (a verify a little dearer than a plain step, drafting cheap)
    rather than measured ones: measuring takes a minute on a CI core."""
    verify = (0.01,) + tuple(0.012 + 0.001 * k for k in range(1, MAX_DRAFT + 1))
    generate = importlib.import_module("mlx_gemma_mtp.generate")  # the package's `generate` is the function

    def load_costs(target, drafter, batches):
        return Costs(batches=tuple(batches), verify=(verify,) * len(batches), draft=(0.001,) * len(batches))

    monkeypatch.setattr(generate, "load_costs", load_costs)


def test_batched_cells_replay_exactly_against_their_costs(tmp_path, known_costs):
    out = tmp_path / "bench.json"
    argv = TINY + ["--batches", "1", "2", "--max-l", "3", "--alphas", "0", "1", "--ragged", "--ks", "2", "auto",
                   "--trials", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())["results"][0]
    for B in ("1", "2"):
        costs = result["costs"][B]
        assert set(costs["verify_ms"]) == set(costs["verify_alone_ms"]) == {"1", "2", "3", "1r"}
        assert costs["drafter_ms"]["step"] >= 0
        entry = result["batches"][B]
        assert entry["mlx_lm_same_tokens"] == 8  # mlx-lm's batched greedy decoding agrees with ours
        assert math.isfinite(entry["plain_vs_mlx_lm"]) and entry["plain_vs_mlx_lm"] > 0
    one = {(c["acceptance"], c["k"]) for c in result["batches"]["1"]["cells"]}
    assert {a for a, _ in one} == {"alpha=0.0", "alpha=1.0"}  # a ragged mix needs two rows
    cells = {(c["acceptance"], c["k"]): c for c in result["batches"]["2"]["cells"]}
    assert len(one) == 4 and len(cells) == 6
    for batch in result["batches"].values():
        for cell in batch["cells"]:
            assert cell["same_as_plain"] == 8 and cell["replay_passes"] == 1
            assert math.isfinite(cell["speedup"]) and math.isfinite(cell["of_ideal"]) and cell["peak_gb"] > 0
    assert cells["alpha=0.0", 2]["acceptance_rate"] == 0
    assert cells["alpha=1.0", 2]["acceptance_rate"] == 1 and cells["alpha=1.0", 2]["accepted_per_round"] == 2
    # Every draft kept is what alpha = 1 is due: no luck to take out; a ragged mix has none reported.
    kept_all = cells["alpha=1.0", 2]
    assert kept_all["expected_accepted_per_round"] == 2
    assert kept_all["speedup_at_expected"] == pytest.approx(kept_all["speedup"])
    assert "speedup_at_expected" not in cells["ragged=0.9/0.2", 2]
    # The ideal from this run's batched costs: alpha = 1 yields k + 1 tokens a round ...
    verify, draft = result["costs"]["2"]["verify_ms"], result["costs"]["2"]["drafter_ms"]["step"]
    ideal = {k: (k + 1) * verify["1"] / (verify[str(k + 1)] + k * draft) for k in (1, 2)} | {0: 1.0}
    assert cells["alpha=1.0", 2]["ideal"] == pytest.approx(ideal[2])
    alone = result["costs"]["2"]["verify_alone_ms"]  # the same from forwards timed alone
    assert cells["alpha=1.0", 2]["ideal_alone"] == pytest.approx(3 * alone["1"] / (alone["3"] + 2 * draft))
    # ... auto is held to the best fixed k's, and drafts where drafts are kept ...
    auto = cells["alpha=1.0", "auto"]
    assert auto["acceptance_rate"] == 1 and auto["ideal"] == pytest.approx(max(ideal.values()))
    # ... with what it started from (the fixture's costs) and what it believed at the end.
    assert auto["calibrated_ms_by_k"][:3] == pytest.approx([10.0, 14.0, 16.0])  # verify + k drafter steps
    assert len(auto["believed_ms_by_k"]) == MAX_DRAFT + 1 and all(ms > 0 for ms in auto["believed_ms_by_k"])
    assert "believed_ms_by_k" not in cells["alpha=1.0", 2]
    # ... and a ragged mix the mean of its rows' expected tokens (no clamping to either).
    mix = (1 + 0.9 + 0.81 + 1 + 0.2 + 0.04) / 2
    assert cells["ragged=0.9/0.2", 2]["ideal"] == pytest.approx(mix * verify["1"] / (verify["3"] + 2 * draft))
    # Steps while every row decodes, and after the first row ended (the slow row alone); rows
    # keeping every draft end together: no tail.
    ragged = cells["ragged=0.9/0.2", 2]
    assert ragged["full_step_ms"] > 0 and ragged["tail_step_ms"] > 0 and ragged["tail_steps"] >= 1, ragged
    assert cells["alpha=1.0", 2]["full_step_ms"] > 0 and "tail_step_ms" not in cells["alpha=1.0", 2]


def test_the_draft_lengths_of_a_spec_share_their_trials_in_turning_order(tmp_path, monkeypatch):
    """Each trial runs plain and every draft length once, the order turning from trial to trial
    (after each length's warm-up), and every cell pairs with the same plain runs."""
    calls = []
    engine_run = measure.engine_run

    def logged(target, drafter, prompts, n, k, **kwargs):
        calls.append(k.ks if isinstance(k, bench.Cycle) else k)
        return engine_run(target, drafter, prompts, n, k, **kwargs)

    monkeypatch.setattr(measure, "engine_run", logged)
    out = tmp_path / "bench.json"
    argv = TINY + ["--parts", "e2e", "--batches", "1", "--max-l", "4", "--alphas", "1", "--ks", "1", "1/3",
                   "--trials", "3", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    assert calls[-9:] == [0, 1, (1, 3), 1, (1, 3), 0, (1, 3), 0, 1]  # after the warm-ups
    cells = json.loads(out.read_text())["results"][0]["batches"]["1"]["cells"]
    assert [c["k"] for c in cells] == [1, "1/3"]
    assert cells[0]["plain_tokens_per_s"] == cells[1]["plain_tokens_per_s"]  # the same plain runs


def test_auto_variants_run_beside_auto(tmp_path, monkeypatch, known_costs):
    """`--ks auto:field=value,...`: auto with those `Rules` changed, a fresh one each run, its
    cell named by that spelling; `auto-kept`: one auto through a cell's runs; the cost surface
    at the end-to-end runs' middle context."""
    rules, policies = [], []
    engine_run = measure.engine_run

    def logged(target, drafter, prompts, n, k, **kwargs):
        rules.append(k.rules if isinstance(k, bench.Auto) else k)
        policies.append(k)
        return engine_run(target, drafter, prompts, n, k, **kwargs)

    monkeypatch.setattr(measure, "engine_run", logged)
    out, spelling = tmp_path / "bench.json", "auto:own_share=0,timings=3"
    argv = [a for a in TINY if a not in ("--context", "32")]
    argv += ["--parts", "cost", "e2e", "--batches", "1", "--max-l", "3", "--alphas", "0", "1", "--ks", "auto",
             spelling, "auto-kept", "--trials", "2", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["arguments"]["context"] == "20"  # --prompt 16 + --tokens 8 / 2
    cells = report["results"][0]["batches"]["1"]["cells"]
    assert [c["k"] for c in cells] == ["auto", spelling, "auto-kept"] * 2
    changed = dataclasses.replace(bench.Rules(), own_share=False, timings=3)
    assert rules.count(changed) == 6 and "auto" in rules  # a warm-up and 2 trials a cell; auto's own
    variants = [p for p, r in zip(policies, rules) if r == changed]
    assert len({id(p) for p in variants}) == 6  # afresh each run
    # "auto-kept": one policy through a cell's runs (its warm-up's teaching kept), one per cell
    kept = [p for p, r in zip(policies, rules) if isinstance(p, bench.Auto) and r == bench.Rules()]
    assert len(kept) == 6 and len({id(p) for p in kept}) == 2
    assert all(len(c["believed_ms_by_k"]) == MAX_DRAFT + 1 for c in cells)  # every one an auto


def test_auto_reads_and_keeps_its_calibration_where_told(tmp_path, monkeypatch):
    """`--costs DIR`: auto's costs come from DIR and what is measured is kept there (bench/costs
    carries the GPU machine's from one session to the next), the user's cache left alone."""
    costs = importlib.import_module("mlx_gemma_mtp.costs")
    measured = []

    def measure_costs(target, drafter, batch, progress):
        measured.append(batch)
        return {"verify": [0.01 + 0.002 * k for k in range(MAX_DRAFT + 1)], "draft": 0.001, "seconds": 0.5}

    monkeypatch.setattr(costs, "measure_costs", measure_costs)
    monkeypatch.setattr(costs, "COST_DIR", tmp_path / "home")
    argv = TINY + ["--parts", "e2e", "--batches", "2", "--alphas", "0", "--ks", "auto", "--trials", "1",
                   "--costs", str(tmp_path / "kept"), "--out", str(tmp_path / "bench.json")]  # fmt: skip
    assert bench.main(argv) == 0 and measured == [1, 2]
    [kept] = (tmp_path / "kept").glob("costs-*.json")
    assert set(json.loads(kept.read_text())["batches"]) == {"1", "2"} and not (tmp_path / "home").exists()
    assert bench.main(argv) == 0 and measured == [1, 2]  # the second run reads what the first kept


def test_a_cycle_of_draft_lengths_runs_a_round_of_each_and_is_held_to_the_surface(tmp_path):
    out = tmp_path / "bench.json"
    argv = TINY + ["--parts", "cost", "e2e", "--batches", "1", "--max-l", "4", "--alphas", "1", "--ks", "1/3",
                   "--tokens", "24", "--trials", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    (cell,) = json.loads(out.read_text())["results"][0]["batches"]["1"]["cells"]
    assert cell["k"] == "1/3" and cell["same_as_plain"] == 24 and cell["acceptance_rate"] == 1
    rounds = cell["row_rounds_by_k"]  # every draft kept: 2 and 4 tokens a round, in turn
    assert rounds["1"] >= 3 and rounds["3"] >= 3 and rounds["1"] - rounds["3"] in (-1, 0, 1)
    assert set(rounds) <= {"0", "1", "2", "3"}  # fewer only where fewer tokens remain
    assert cell["ms_per_round"] > 0 and cell["plain_ms_per_round"] > 0
    assert 0 < cell["device_share"] <= 1 and 0 < cell["plain_device_share"] <= 1  # read-backs waited
    assert math.isfinite(cell["surface_ms_per_round"]) and math.isfinite(cell["beyond_plain"])


def test_draft_lengths_parse_or_name_the_bad_one():
    assert [bench.parse_k(k) for k in ("5", "auto", "7/8/9")] == [5, "auto", (7, 8, 9)]
    assert bench.parse_k("auto:own_share=0,timings=3") == "auto:own_share=0,timings=3"
    assert bench.auto_rules("auto:own_share=0,timings=3,prior=0.6") == dataclasses.replace(
        bench.Rules(), own_share=False, timings=3, prior=0.6
    )
    for bad in ("17", "7/x", "", "3/", "auto/3", "auto:", "auto:nope=1", "auto:timings", "auto:timings=x"):
        with pytest.raises(ValueError, match="--ks"):
            bench.parse_k(bad)
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--ks", "5/99"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--cost-trials", "0"])


def test_the_bench_tools_run_mlx_cuda_without_graphs_unless_told():
    """A Mac has no CUDA graphs, and on MLX CUDA they cost every new batch size a capture."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_USE_CUDA_GRAPHS"}
    show = [sys.executable, "-c", "import os, bench.churn; print(os.environ['MLX_USE_CUDA_GRAPHS'])"]
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "0"
    env["MLX_USE_CUDA_GRAPHS"] = "1"
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "1"


def test_paired_trials_alternate_which_run_goes_first(tmp_path, monkeypatch):
    calls = []
    engine_run = measure.engine_run

    def recorded(target, drafter, *args, **kwargs):
        calls.append("plain" if drafter is None else "speculative")
        return engine_run(target, drafter, *args, **kwargs)

    monkeypatch.setattr(measure, "engine_run", recorded)
    argv = TINY + ["--parts", "e2e", "--batches", "1", "--alphas", "0.5", "--ks", "2", "--trials", "3",
                   "--out", str(tmp_path / "bench.json")]  # fmt: skip
    assert bench.main(argv) == 0
    # The cell's warm-up, then three pairs: plain first, then the speculative run first, ...
    assert calls[-7:] == ["speculative"] + ["plain", "speculative"] + ["speculative", "plain"] + [
        "plain",
        "speculative",
    ]


def test_a_cycled_target_walks_distinct_tokens_and_stays_off_the_disk(tmp_path):
    """The bench's calm target predicts its input's successor in one cycle (a MoE's verify then
    routes distinct tokens, as text's), in our loop and mlx-lm's alike; the stop ids stay fixed;
    a pair written to files would lose the cycle, so writing one is refused."""
    target, drafter = build("tiny")
    successor = np.array(target.model.embed_tokens._successor)
    vocab = target.args.vocab_size
    assert sorted(successor.tolist()) == list(range(vocab))
    assert all(successor[i] == i for i in (*range(4), *target.config.stop_ids))
    prompt = measure.random_prompts(1, 16, vocab, seed=3)[0]
    ours = measure.engine_run(target, None, [prompt], 24, 0).tokens[0]
    assert ours == successor[[prompt[-1]] + ours[:-1]].tolist()  # each token its input's successor
    assert len(set(ours)) == len(ours)
    theirs = measure.mlx_lm_run(measure.mlx_lm_model(target), [prompt], 24).tokens[0]
    assert theirs == ours
    with pytest.raises(ValueError, match="a cycled target .* cannot be written"):
        peer.write_pair(target, drafter, tmp_path)


def test_acceptance_specs_and_the_replay_table():
    profile = replay.parse_acceptance("profile=26b-vllm").chances(1)[0]
    assert profile[:4] == pytest.approx([0.844, 0.599 / 0.844, 0.385 / 0.599, 0.271 / 0.385])
    assert len(profile) == MAX_DRAFT and profile[4:] == [profile[3]] * (MAX_DRAFT - 4)
    ragged = replay.parse_acceptance("ragged=0.9/0.2").chances(4)
    assert [row[0] for row in ragged] == [0.9, 0.2, 0.9, 0.2]
    for bad in ("alpha=1.5", "profile=nope", "beta=0.5", "ragged=x"):
        with pytest.raises(ValueError, match="acceptance"):
            replay.parse_acceptance(bad)
    # Draft i of a round at continuation index j is token j + 1 + i where it hits, else + 1.
    continuation = [10, 11, 12, 13, 14]
    hits = replay.draw_hits([[0.5] * MAX_DRAFT], len(continuation), seed=0)
    table = np.array(replay.replay_table([continuation], hits, vocab=100))
    assert table[0, 1, 2] == (14 if hits[0, 1, 2] else 15)
    assert table.shape == (1, 5, MAX_DRAFT) and 0.3 < hits.mean() < 0.7
    # One draw per position: every round drafting position p gets the same outcome there.
    by_position = replay.position_hits(np.arange(5 + MAX_DRAFT + 1)[None] % 2 == 0)
    assert by_position[0, 0, 2] == by_position[0, 1, 1] == by_position[0, 2, 0] == (3 % 2 == 0)
    assert hits[0, 0, 2] == hits[0, 1, 1] == hits[0, 2, 0]  # draws too: one per position


def test_replayed_hits_share_each_positions_draw_and_keep_the_profiles_chances():
    """Every round drafting a position meets the same draw there (a deeper draft, at a lower
    chance, is right there only where a shallower one is), and a fixed k walking the table keeps
    its first m drafts in the share of rounds the profile says (0.844, 0.599, 0.385, 0.271)."""
    chances = replay.parse_acceptance("profile=26b-vllm").chances(1)
    width = 40_000
    hits = replay.draw_hits(chances, width, seed=3)[0]
    # Position p as draft 1 of the round at p - 1 (chance 0.844) and as draft 4 of the round at p - 4.
    shallow, deep = hits[3:, 0], hits[:-3, 3]
    assert deep.any() and not (deep & ~shallow).any() and (shallow & ~deep).any()
    kept, j = [], 0
    while j < width:
        row = hits[j, :4]
        m = int(np.argmin(row)) if not row.all() else 4
        kept.append(m)
        j += m + 1
    kept = np.array(kept)
    shares = [float((kept >= m).mean()) for m in range(1, 5)]
    assert shares == pytest.approx([0.844, 0.599, 0.385, 0.271], abs=0.02)


def test_old_loop_and_engine_run_alike_on_the_same_weights(tmp_path):
    try:
        compare_loops.extract(tmp_path / "old")
    except SystemExit as e:  # a checkout without the old commit (a shallow clone)
        pytest.skip(str(e))
    out = tmp_path / "compare.json"
    argv = ["--old-root", str(tmp_path / "old"), "--shapes", "tiny", "--alphas", "1", "--ks", "2",
            "--prompt", "16", "--tokens", "8", "--trials", "1", "--out", str(out)]  # fmt: skip
    assert compare_loops.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["old_commit"].startswith(compare_loops.OLD_COMMIT)
    result = report["results"][0]
    assert result["old_plain_same"] == 8
    plain, drafting = result["modes"]
    assert plain["mode"] == "plain" and drafting["mode"] == "alpha=1.0 k=2"
    for mode in result["modes"]:
        assert mode["same_as_plain"] == 8 and math.isfinite(mode["new_over_old"]) and mode["new_over_old"] > 0
    # k = 2, 8 tokens: the first, two rounds of 2 kept + 1, then one plain step (1 token left).
    assert drafting["old_accepted"] == drafting["new_accepted"] == [4]


def test_an_absolute_import_in_the_old_package_is_refused(tmp_path):
    (tmp_path / "speculative.py").write_text("import mlx\nfrom mlx_gemma_mtp.cache import Cache\n")
    with pytest.raises(SystemExit, match=r"speculative.py:2"):
        compare_loops.check_relative(tmp_path)


def test_extract_names_a_missing_commit(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    with pytest.raises(SystemExit, match="git rev-parse"):
        compare_loops.extract(tmp_path, commit="0000000000")


def test_profile_splits_a_verify_into_its_parts(tmp_path):
    from bench import profile

    out = tmp_path / "profile.json"
    argv = ["--shape", "tiny", "--batch", "2", "--context", "80", "--lengths", "1", "3", "--trials", "1"]
    assert profile.main(argv + ["--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"forward", "body", "head", "projections", "attention"}
    assert all(set(by_length) == {"1", "3"} and min(by_length.values()) > 0 for by_length in rows.values())
    with pytest.raises(SystemExit):  # past what a verify may hold
        profile.main(["--shape", "tiny", "--lengths", "18"])


def test_timeline_times_every_step_of_every_variant(tmp_path, known_costs, capsys):
    from bench import timeline

    out = tmp_path / "timeline.json"
    argv = ["--shape", "tiny", "--batch", "2", "--prompt", "16", "--tokens", "8", "--runs", "2"]
    assert timeline.main(argv + ["--alpha", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert set(steps) == {"plain", "mlx-lm", "auto"} and all(len(runs) == 2 for runs in steps.values())
    # Every token after each row's first, in steps: plain and mlx-lm one per row and step.
    for runs in steps.values():
        assert all(sum(step[1] for step in run) == 2 * 7 and all(step[0] > 0 for step in run) for run in runs)
    assert all(len(run) == 7 and {step[3] for step in run} == {2} for run in steps["plain"] + steps["mlx-lm"])
    assert all(sum(step[2] for step in run) > 0 for run in steps["auto"])  # alpha = 1: auto keeps drafts
    assert report["order"] == [["plain", "mlx-lm", "auto"], ["auto", "mlx-lm", "plain"]]
    assert report["environment"]["MLX_USE_CUDA_GRAPHS"] == os.environ["MLX_USE_CUDA_GRAPHS"]
    # Auto's every call, the warm-up's first: replayed on its costs it chooses as it did, and
    # believes of the k it chose the best rate of those it could choose among.
    calls, costs = report["calls"]["auto"], Costs.from_json(report["calls"]["costs"])
    assert len(calls) == 3 and all(
        call[0] in ("choose", "observe", "observe_time", "forget") for call in calls[1]
    )
    believed = timeline.beliefs(calls[1], costs)
    assert [b["k"] for b in believed] == [call[3] for call in calls[1] if call[0] == "choose"]
    observed = [call for call in calls[1] if call[0] == "observe"]
    assert observed and all(kept == call[1] for call in observed for _, kept in call[2])  # alpha = 1
    late = believed[-1]  # after rounds that kept every draft: a_1 over the prior 0.5
    assert late["rows"] == 2 and len(late["expected"]) == len(late["ms"]) > 1
    assert late["expected"][0] == 2 and late["expected"][1] > 2 * 1.5
    tampered = [call[:3] + [call[3] + 1] if call[0] == "choose" else call for call in calls[1]]
    with pytest.raises(ValueError, match="choice 0: the replay chose"):
        timeline.beliefs(tampered, costs)
    capsys.readouterr()
    # A ragged batch with a fixed k: the row keeping every draft ends first, the other goes on alone.
    argv += ["--acceptance", "ragged=1/0", "--ks", "3", "--out", str(out)]
    assert timeline.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["acceptance"] == "ragged=1/0" and set(report["steps"]) == {"plain", "mlx-lm", "auto", "k=3"}
    for run in report["steps"]["k=3"]:
        rows = [step[3] for step in run]
        assert rows == sorted(rows, reverse=True) and rows[0] == 2 and rows[-1] == 1, rows
    printed = capsys.readouterr().out
    assert "k=3" in printed and "steps by rows 2: " in printed and ", 1: " in printed


def test_the_timeline_reports_each_policys_opening_and_its_rounds_by_k():
    """From recorded calls, the warm-up left out: the first choices of each run, and the
    own-share timings at the full batch by k (median, count, spread about each run's median;
    none where no run timed that k twice)."""
    from bench import timeline

    def run(ks, timings):
        calls = [["choose", 16, [0, 1], k] for k in ks]
        calls += [["observe_time", k, batch, 1.0, ms / 1e3] for k, batch, ms in timings]
        return calls

    warm = run([5, 5], [(5, 2, 99.0)])
    first = run([3, 0, 9, 9], [(9, 2, 20.0), (9, 2, 20.0 * math.e**0.1), (9, 1, 5.0), (0, 2, 10.0)])
    second = run([3, 0, 8], [(9, 2, 30.0), (9, 2, 30.0 * math.e**-0.1)])
    lines = timeline.policy_lines({"costs": {}, "auto": [warm, first, second]}, batch=2, opening=3)
    assert lines == [
        "auto    opens 3 0 9 / 3 0 8; own-share ms by k at B = 2: 0: 10.0 ms x1, 9: 24.6 ms x4 (sd 0.050)"
    ]


def test_churn_times_the_steps_after_rows_leave_and_join(tmp_path, capsys):
    from bench import churn

    out = tmp_path / "churn.json"
    argv = ["--shape", "tiny", "--batch", "4", "--ks", "2", "--events", "2", "--gap", "3", "--prompt", "16"]
    assert churn.main(argv + ["--switch", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["MLX_USE_CUDA_GRAPHS"] == os.environ["MLX_USE_CUDA_GRAPHS"]
    cases = {(c["event"], c["hold_steps"]): c for c in report["cases"]}
    joins = ("leave and join", "late join")
    assert set(cases) == {(e, h) for e in ("leave", *joins) for h in (8, 0)} | {("switch k to 5", 8)}
    assert all(len(c["after_ms"]) == 3 and min(c["after_ms"]) > 0 for c in cases.values())
    # Without held slots each leave shrinks the batch; with them it keeps its size until half
    # its rows are held; a request taking a held slot (or a freed row) keeps it whole.
    assert cases["leave", 0]["slots_after_each_event"] == [3, 2]
    assert cases["leave", 8]["slots_after_each_event"] == [4, 2]
    assert all(cases[event, hold]["slots_after_each_event"] == [4, 4] for event in joins for hold in (8, 0))
    assert cases["switch k to 5", 8]["slots_after_each_event"] == [4, 4]
    by_k = cases["switch k to 5", 8]["row_rounds_by_k"]  # 4 rows, 2 events: 8 row-rounds at k = 5
    assert by_k[5] == 8 and by_k[2] > 0 and sum(by_k) == by_k[2] + 8, by_k
    assert "late join" in capsys.readouterr().out
    for bad, says in (
        (["--events", "4"], "--events 4 must be 1 or more and below --batch 4"),
        (["--switch", "17"], "draft length 17 (--ks, --switch) must be in 0..16"),
        (["--holds", "-1"], "hold_steps must be 0 or more"),
        (["--gap", "0"], "--gap 0 must be 1 or more"),
    ):
        with pytest.raises(SystemExit):
            churn.main(argv + bad)
        assert says in capsys.readouterr().err


def test_a_cell_at_its_expected_kept_drafts():
    """`_at_expectation`: a cell that kept more than its draft lengths are due is scaled down by
    the tokens its row-rounds would have made (plain rounds make one each, and are no drafting)."""
    cell = {"row_rounds_by_k": {"0": 2, "2": 4}, "accepted_per_round": 1.0, "speedup": 2.0}
    out = bench._at_expectation(cell, [[0.5] * MAX_DRAFT] * 2)
    assert out["expected_accepted_per_round"] == pytest.approx(0.75)  # 0.5 + 0.25 a drafting round
    assert out["speedup_at_expected"] == pytest.approx(2.0 * (6 + 3) / (6 + 4))
    assert bench._at_expectation(cell, [[0.9] * MAX_DRAFT, [0.2] * MAX_DRAFT]) == {}  # ragged
    assert bench._at_expectation(cell | {"row_rounds_by_k": {"0": 6}}, [[0.5] * MAX_DRAFT]) == {}


def test_the_server_bench_replays_acceptance_through_the_server(tmp_path):
    """`bench.serve --alphas 1.0`: the server (a subprocess running `bench.serve_replay`) and the
    engine in process keep every replayed draft, looked up by each request's seed; the random
    drafter's own drafts are measured beside them."""
    import socket

    from bench import serve

    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "serve.json"
    argv = ["--shape", "tiny", "--bits", "bf16", "--clients", "2", "--requests", "2", "--prompt", "16"]
    argv += ["--tokens", "12", "--trials", "1", "-k", "3", "--alphas", "1.0", "--sides", "serve", "engine"]
    assert serve.main([*argv, "--port", str(port), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"serve", "engine", "serve alpha=1.0", "engine alpha=1.0"}
    for label in ("serve alpha=1.0", "engine alpha=1.0"):
        run = results[label]["2"]
        assert run["requests"] == 4 and run["drafted"] > 0 and run["accepted"] == run["drafted"], (label, run)
        assert 0 < run["median_request_s"] < run["wall_s"]  # each side times its requests as a client does
        assert 1 <= run["k_mean"] <= 3 and 0 <= run["k_sd"] < 1, (label, run)  # k = 3 but near the end
    for label, by in results.items():  # each side's steps: the server's worker totals, the engine's own
        run = by["2"]
        assert run["steps"] > 0 and 0 < run["rows_per_step"] <= 2 and run["ms_per_step"] > 0, (label, run)
        assert 0 <= run["device_share"] < 1, (label, run)
    # In process a client's second request follows its first at once (the server's rows here end
    # in the same step, the engine idles, and what follows is no refill: tests/test_server.py).
    assert (
        0 < results["engine alpha=1.0"]["2"]["refill_ms"] < results["engine alpha=1.0"]["2"]["wall_s"] * 1e3
    )
    ratios = json.loads(out.read_text())["ratios"]
    assert "serve alpha=1.0/engine alpha=1.0" in ratios
    added = json.loads(out.read_text())["added_seconds"]["serve alpha=1.0 - engine alpha=1.0"]["2"]
    expected = (
        results["serve alpha=1.0"]["2"]["median_request_s"]
        - results["engine alpha=1.0"]["2"]["median_request_s"]
    )
    assert added == pytest.approx(expected)
    steady = json.loads(out.read_text())["steady_ratios"]["serve alpha=1.0/engine alpha=1.0"]["2"]
    assert steady > 0 and all(r["2"]["steady_tokens_per_s"] > 0 for r in results.values())
    # Each step of the run timed, in order, so a GPU run can be planned from the last one's.
    seconds = json.loads(out.read_text())["seconds"]
    assert list(seconds) == [
        "built", "written", "replays", "serve up", "engine up", "own drafter, 2 clients",
        "serve alpha=1.0 up", "engine alpha=1.0 up", "alpha=1.0, 2 clients",
    ]  # fmt: skip
    assert all(s >= 0 for s in seconds.values()) and seconds["engine up"] > 0


# A server that is up (/health answers) and dies on its first request, as a crashed one does.
DYING_SERVER = """
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def do_POST(self):
        os._exit(3)
    def log_message(self, *args):
        '''Quiet: the test reads the client's error, not the server's request log.'''
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_the_server_bench_names_the_side_whose_server_died(monkeypatch, tmp_path):
    """A request that fails says which side's server it was and that its process exited (r52's
    first run ended in a bare "Connection reset by peer")."""
    import argparse
    import contextlib
    import socket

    from bench import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", DYING_SERVER, str(port)]
    monkeypatch.setattr(serve, "serve_command", lambda *a, **k: (command, "/health"))
    args = argparse.Namespace(clients=[2], requests=1, tokens=4)
    says = r"^mlx_lm \(http://127.0.0.1:\d+\): .*its process exited with 3"
    with contextlib.ExitStack() as stack, pytest.raises(RuntimeError, match=says):
        stack.enter_context(serve.open_server("mlx_lm", tmp_path, ["a", "b"], args, port))  # warm-up dies


def test_the_server_bench_leaves_the_last_requests_tail_out_of_its_steady_rate():
    """Tokens per second until the last request was sent: requests done by then count whole, one
    running across that moment in proportion, one sent then not at all."""
    from bench import serve

    records = [
        {"tokens": 10, "start": 0.0, "end": 1.0},
        {"tokens": 10, "start": 0.0, "end": 2.0},  # 1.5 of its 2 s before the cut: 7.5 tokens
        {"tokens": 10, "start": 1.0, "end": 1.5},
        {"tokens": 10, "start": 1.5, "end": 9.0},  # the last sent: the cut; a slow tail after it
    ]
    assert serve._steady(records) == pytest.approx((10 + 7.5 + 10) / 1.5)
    assert serve._steady([{"tokens": 8, "start": 0.0, "end": 2.0}]) == 4.0  # one request: its own rate


def test_the_server_bench_refuses_replayed_only_without_an_alpha(capsys):
    from bench import serve

    with pytest.raises(SystemExit):
        serve.main(["--shape", "tiny", "--replayed-only"])
    assert "--replayed-only measures the --alphas cases" in capsys.readouterr().err


def test_the_forward_probe_records_a_failing_shape_and_goes_on(tmp_path, monkeypatch):
    from bench import forward_probe, measure

    timed = measure.forward_ms

    def flaky(target, cache, tokens, context):
        if tokens.shape[1] == 2:
            raise RuntimeError("cuGraphAddKernelNode(...) failed: invalid argument")
        return timed(target, cache, tokens, context)

    monkeypatch.setattr(measure, "forward_ms", flaky)
    out = tmp_path / "probe.json"
    argv = ["--shape", "tiny", "--bits", "bf16", "--batches", "2", "--lengths", "1", "2", "3"]
    assert forward_probe.main([*argv, "--context", "70", "--out", str(out)]) == 0
    forwards = json.loads(out.read_text())["forwards"]["2"]
    assert forwards["2"] == {"error": "RuntimeError: cuGraphAddKernelNode(...) failed: invalid argument"}
    assert forwards["1"]["ms"] > 0 and forwards["3"]["ms"] > 0
    with pytest.raises(SystemExit):
        forward_probe.main([*argv[:-3], "0", "--out", str(out)])


def test_the_server_bench_alternates_its_sides_and_pairs_their_trials():
    """`bench.serve.run_case`: each trial runs every side, the order turning, and a ratio is the
    median of the trials' paired ratios (a drifting card moves both sides of a pair alike)."""
    from bench import serve

    calls, speeds = [], {"a": iter([10.0, 30.0, 20.0]), "b": iter([5.0, 10.0, 4.0])}

    def side(label):
        def run(clients):
            calls.append(label)
            return {"requests": clients, "tokens": 1, "tokens_per_s": next(speeds[label])}

        return run

    out = serve.run_case({"a": side("a"), "b": side("b")}, 4, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out["a"]["tokens_per_s"] == 20.0 and out["a"]["tokens_per_s_trials"] == [10.0, 30.0, 20.0]
    ratios = serve._ratios({"serve": {4: out["a"]}, "engine": {4: out["b"]}})
    assert ratios == {"serve/engine": {"4": 3.0}}  # the median of 2, 3 and 5; not 20 / 5
