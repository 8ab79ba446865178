"""The benchmark's pipeline end to end on a tiny model (CPU): every part runs, the replayed
runs reproduce plain decoding exactly (the CPU backend is batch-invariant), and the replay
really controls acceptance."""

from __future__ import annotations

import json

import pytest

import bench
from bench import table
from mlx_gemma_mtp.draft_length import MAX_DRAFT


def test_quick_benchmark_runs_and_replays_exactly(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--shapes", "tiny", "--bits", "bf16", "--contexts", "48", "--max-l", "4", "--prompt", "32",
        "--alphas", "0", "0.5", "1", "--ks", "0", "2", "auto", "--tokens", "16", "--trials", "2", "--cost-repeats", "1", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())["results"][0]
    assert set(result["verify_ms"]["48"]) == {"1", "2", "3", "4"}
    assert result["drafter_head_bytes"]["clustered"] < result["drafter_head_bytes"]["dense"]
    assert result["mlx_lm_same_tokens"] == 16  # mlx-lm's own greedy decoding agrees with ours
    assert result["plain_vs_mlx_lm"] > 0  # paired trials: the median of mlx-lm's ms over ours
    cells = {(c["alpha"], c["k"]): c for c in result["e2e"]}
    for cell in cells.values():
        assert cell["same_as_plain"] == 16 and cell["replay_passes"] == 1
    assert cells[(0.0, 2)]["accepted_per_round"] == 0 == cells[(0.0, 2)]["acceptance"]
    assert cells[(1.0, 2)]["accepted_per_round"] == 2  # every replayed draft accepted
    assert cells[(1.0, 2)]["acceptance"] == 1
    # Each trial draws its own hits: at alpha = 0.5 the trials keep different drafts.
    assert len(set(cells[(0.5, 2)]["accepted_per_trial"])) == 2
    # The ideal from the costs as the loop runs them, timed apart from auto's (alpha = 1: k + 1
    # tokens per round) ...
    assert len(result["loop_costs_ms"]["verify"]) == MAX_DRAFT + 1  # what auto started from
    loop = result["ideal_costs_ms"]
    round_cost = loop["verify"][2] + 2 * loop["draft"]
    assert cells[(1.0, 2)]["ideal"] == pytest.approx(3 * loop["plain"] / round_cost)
    assert cells[(1.0, 2)]["ideal_one_at_a_time"] > 0  # ... and from the cost curve's forwards
    # The prediction for the rounds the run drafted: k = 0, plain steps only, predicts plain ...
    assert cells[(1.0, 0)]["predicted"] == pytest.approx(1.0)
    # ... and for k = 2 at alpha = 1 about the ideal (the last rounds are cut short).
    assert cells[(1.0, 2)]["predicted"] == pytest.approx(cells[(1.0, 2)]["ideal"], rel=0.2)
    assert cells[(1.0, 0)]["chosen_k"] == {"0": 30} and cells[(1.0, 0)]["ideal"] == 1  # k = 0: the loop, no drafts
    # Auto's rounds, in order, per trial: where each began and what it kept (alpha = 1: all).
    auto = cells[(1.0, "auto")]
    assert [sum(kept for _, _, kept in log) for log in auto["round_log"]] == auto["accepted_per_trial"]
    for log in auto["round_log"]:
        assert log and all(kept == k for _, k, kept in log)
        assert all(b[0] >= a[0] + a[2] + 1 for a, b in zip(log, log[1:]))  # the next begins after
    # The README's table row: a column per header, "–" where no cell is (alpha 0.8, 0.5-0.9).
    row = table.row(result).strip("| ").split(" | ")
    assert len(row) == table.HEADER.splitlines()[0].count("|") - 1
    assert "–" not in row[:4] + row[6:] and row[4:6] == ["–"] * 2  # no alpha 0.8 cells


def test_profile_splits_a_verify_into_its_parts(tmp_path):
    from bench import profile

    out = tmp_path / "profile.json"
    argv = ["--shape", "tiny", "--context", "80", "--lengths", "1", "3", "--trials", "1", "--out", str(out)]
    assert profile.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"forward", "body", "head", "projections", "attention"}
    assert all(set(by_length) == {"1", "3"} and min(by_length.values()) > 0 for by_length in rows.values())
    with pytest.raises(SystemExit):  # past what a verify may hold
        profile.main(["--shape", "tiny", "--lengths", "18"])


def test_timeline_times_every_yield_of_every_variant(tmp_path):
    from bench import timeline

    out = tmp_path / "timeline.json"
    argv = ["--shape", "tiny", "--alpha", "1", "--tokens", "12", "--runs", "2", "--out", str(out)]
    assert timeline.main(argv) == 0
    report = json.loads(out.read_text())
    runs, drafts = report["yield_ms"], report["from_draft"]
    assert set(runs) == set(drafts) == {"plain", "mlx-lm", "k=0", "auto"}
    assert all(len(ms) == 2 and all(len(one) == 11 for one in ms) for ms in runs.values())
    assert all(ms > 0 for one in runs["auto"] for ms in one)
    assert not any(d for one in drafts["plain"] for d in one)  # plain tokens are never drafts
    assert any(d for one in drafts["auto"] for d in one)  # alpha = 1: auto keeps drafts
    # Auto's drafting rounds per run: every draft kept, and each kept draft one yielded.
    logs = report["round_log"]["auto"]
    assert len(logs) == 2 and all(kept == k for log in logs for _, k, kept in log)
    assert [sum(kept for _, _, kept in log) for log in logs] == [sum(one) for one in drafts["auto"]]
    # What auto started from, as the bench records it.
    assert len(report["loop_costs_ms"]["verify"]) == MAX_DRAFT + 1 and report["loop_costs_ms"]["plain"] > 0
    # Every other turn in reverse order: no variant always first.
    assert report["order"] == [["plain", "mlx-lm", "k=0", "auto"], ["auto", "k=0", "mlx-lm", "plain"]]


def test_end_to_end_pairs_alternate_which_run_goes_first(tmp_path, monkeypatch):
    calls = []
    plain_run, replay_settled = bench.measure.plain_run, bench._replay_settled

    def plain(*args):
        calls.append("plain")
        return plain_run(*args)

    def speculative(*args, **kwargs):
        calls.append("speculative")
        return replay_settled(*args, **kwargs)

    monkeypatch.setattr(bench.measure, "plain_run", plain)
    monkeypatch.setattr(bench, "_replay_settled", speculative)
    argv = [
        "--shapes", "tiny", "--bits", "bf16", "--parts", "e2e", "--contexts", "48", "--max-l", "2",
        "--prompt", "32", "--alphas", "0.5", "--ks", "2", "--tokens", "8", "--trials", "3", "--cost-repeats", "1",
        "--out", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    # The cell's warm-up, then three pairs: plain first, then the speculative run first, ...
    assert calls[-7:] == ["speculative"] + ["plain", "speculative"] + ["speculative", "plain"] + ["plain", "speculative"]
