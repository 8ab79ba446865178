"""`python -m bench` / `mlx-gemma-mtp bench`: batched speculative decoding at real Gemma 4 shapes.

Per shape: the cost surface (one target forward of B rows x L tokens, the drafter step at B);
per batch size B: our batched plain decoding against mlx-lm's batched generation on the same
weights; then a cell per acceptance spec and draft length: the engine at replayed acceptance
(`replay.py`) against our batched plain decoding in paired trials, with Leviathan's ideal from
this run's costs and peak memory. The draft lengths of one spec share their trials: each trial
runs plain and every draft length in turn, the order turning, so that the card's drift between
minutes moves all of them alike. One JSON of every measurement, written after every spec (a run
cut short keeps its cells), a line per cell on stdout, and PNG plots with matplotlib.
`--quick` runs a tiny model (a CPU check of the whole pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp import costs as costs_module
from mlx_gemma_mtp.cache import MAX_WRITE
from mlx_gemma_mtp.costs import batch_sizes, load_costs
from mlx_gemma_mtp.cuda import GRAPHS, without_graphs_unless_set
from mlx_gemma_mtp.draft_length import Auto, Fixed, Rules
from mlx_gemma_mtp.speculative import MAX_DRAFT, drafter_proposer

from . import measure
from .models import SHAPES, build, nbytes
from .replay import (
    PROFILES,
    RAGGED,
    draw_hits,
    parse_acceptance,
    replay_proposer,
    replay_settled,
    replay_table,
)

# Every bench tool runs MLX CUDA as the commands do: without CUDA graphs unless the environment
# says otherwise (`mlx_gemma_mtp.cuda`; before any tool computes). The JSONs record it.
without_graphs_unless_set()

PARTS = ("cost", "baseline", "e2e")
# Auto kept from run to run of a cell (taught by the cell's warm-up), as an engine serving request
# after request keeps its policy; "auto" starts each run afresh, as `batch_generate` does.
KEPT = "auto-kept"
POLICIES = ("auto", "heuristic", KEPT)


class Cycle(Fixed):
    """A diagnostic draft length: each of `ks` in turn, a round each (fewer only when fewer
    tokens remain); blind to acceptance, timing and rows as a fixed k is. Against a fixed k of
    the same mean on the same hits it shows what changing the verify's shape from one round to
    the next costs (`--ks 7/8/9` beside `--ks 8`)."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks, self.rounds = ks, 0

    def choose(self, limit: int, rows) -> int:
        k = self.ks[self.rounds % len(self.ks)]
        self.rounds += 1
        return min(k, limit)


def auto_rules(k: str) -> Rules:
    """The rules of an "auto:field=value,..." --ks spelling: auto with some of its `Rules`
    changed, beside auto in the same trials (an A/B of a rule on the card). ValueError naming
    a bad one."""
    defaults, changed = Rules(), {}
    names = [f.name for f in dataclasses.fields(Rules)]
    for part in k.removeprefix("auto:").split(","):
        name, _, value = part.partition("=")
        if name not in names or not value:
            raise ValueError(
                f"--ks: {part!r} in {k!r} is not field=value for a field of Rules ({', '.join(names)})"
            )
        kind = type(getattr(defaults, name))  # bool (0 / 1), int or float, as its default
        try:
            changed[name] = bool(int(value)) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--ks: {part!r} in {k!r}: {value!r} is not a {kind.__name__}") from None
    return Rules(**changed)


def parse_k(k: str) -> int | str | tuple[int, ...]:
    """A --ks value: an int in 0..MAX_DRAFT, a policy name, auto with changed rules
    ("auto:own_share=0", `auto_rules`) or a cycle "7/8/9" (ValueError naming a bad one)."""
    if k in POLICIES:
        return k
    if k.startswith("auto:"):
        auto_rules(k)
        return k
    parts = k.split("/")
    if not all(p.isdigit() and int(p) <= MAX_DRAFT for p in parts):
        raise ValueError(
            f"--ks: {k!r} is neither an int in 0..{MAX_DRAFT}, one of {POLICIES}, nor a cycle of "
            f"such ints (7/8/9)"
        )
    return int(k) if len(parts) == 1 else tuple(int(p) for p in parts)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-gemma-mtp bench", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"of {SHAPES} (or 'tiny')")
    p.add_argument("--bits", nargs="+", default=["bf16", "4"], help="bf16 and/or quantization bits")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="rows decoded together")
    p.add_argument(
        "--alphas", nargs="*", type=float, default=[0.0, 0.6, 0.8], help="uniform replayed acceptance"
    )
    p.add_argument(
        "--profile", nargs="*", default=[], choices=sorted(PROFILES), help="per-position acceptance"
    )
    p.add_argument(
        "--ragged", action="store_true", help=f"half the rows at alpha {RAGGED[0]}, half at {RAGGED[1]}"
    )
    p.add_argument(
        "--ks",
        nargs="+",
        default=["auto", "3", "5"],
        help="draft lengths: ints, 'auto' (afresh each run), 'auto-kept' (one policy through a cell's "
        "runs), 'heuristic', auto with changed rules (auto:own_share=0), or a cycle of ints a round "
        "each (7/8/9)",
    )
    p.add_argument(
        "--context",
        type=int,
        help="positions per row before the cost surface's forward (default: the end-to-end runs' "
        "middle, --prompt + --tokens / 2, so that the ideal prices the rounds they run)",
    )
    p.add_argument("--max-l", type=int, default=9, help="cost surface up to this many new tokens per row")
    p.add_argument("--prompt", type=int, default=256, help=f"end-to-end prompt per row (at most {MAX_WRITE})")
    p.add_argument("--tokens", type=int, default=64, help="end-to-end tokens generated per row")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument(
        "--cost-trials",
        type=int,
        default=11,
        help="timings per cost-surface cell (their median): the ideal rests on these",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    p.add_argument(
        "--costs",
        type=Path,
        help="where auto's calibration is read and kept (default: the user's, ~/.cache/mlx-gemma-mtp); "
        "bench/costs holds the GPU machine's, which a run there can reuse and add to",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few cells: a CPU check")
    return p


def _quick(args) -> None:
    args.shapes, args.bits, args.batches, args.context, args.max_l = ["tiny"], ["bf16"], [1, 2], 64, 4
    args.alphas, args.profile, args.ragged, args.ks = [0.0, 0.8], ["26b-vllm"], True, ["2", "auto"]
    args.prompt, args.tokens, args.trials, args.cost_trials = 32, 16, 2, 2


def _check(p: argparse.ArgumentParser, args) -> None:
    for k in args.ks:
        try:
            parse_k(k)
        except ValueError as e:
            p.error(str(e))
    if not 2 <= args.max_l <= MAX_DRAFT + 1:
        p.error(f"--max-l must lie in 2..{MAX_DRAFT + 1} (a verify of up to MAX_DRAFT drafts)")
    if not 0 < args.prompt <= MAX_WRITE:
        p.error(f"--prompt must lie in 1..{MAX_WRITE}: longer prompts join the batch over several steps")
    if min(args.batches) < 1 or args.tokens < 2 or args.trials < 1 or args.cost_trials < 1:
        p.error("--batches, --tokens (at least 2), --trials and --cost-trials must be positive")


def specs(args) -> list:
    out = [parse_acceptance(f"alpha={a}") for a in args.alphas]
    out += [parse_acceptance(f"profile={name}") for name in args.profile]
    if args.ragged:
        out.append(parse_acceptance(f"ragged={RAGGED[0]}/{RAGGED[1]}"))
    return out


def environment() -> dict:
    return {
        "device": str(mx.default_device()),
        "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        GRAPHS: os.environ.get(GRAPHS, ""),
    }


def bench_shape(shape: str, bits: str, args, result: dict, save) -> None:
    """Fill `result` for one shape, calling `save()` after every part and cell."""
    target, drafter = build(shape, bits=None if bits == "bf16" else int(bits))
    proposer = drafter_proposer(drafter, target)  # one compiled drafter step for every run
    result |= {"shape": shape, "bits": bits, "target_bytes": nbytes(target), "drafter_bytes": nbytes(drafter)}
    result |= {"drafter_head_bytes": measure.drafter_head_bytes(drafter), "costs": {}, "batches": {}}
    for B in args.batches:
        if "cost" in args.parts:
            result["costs"][str(B)] = _costs(target, proposer, B, args)
            save()
            print(_cost_line(result, B), flush=True)
    prompts = measure.random_prompts(max(args.batches), args.prompt, target.args.vocab_size, seed=3)
    warm: set = set()
    for B in args.batches:
        entry = result["batches"][str(B)] = {"batch": B}
        _batch(target, drafter, proposer, prompts[:B], args, result, entry, warm, save)
        mx.clear_cache()


def _batch(target, drafter, proposer, rows, args, result: dict, entry: dict, warm: set, save) -> None:
    """One batch size: the baseline, then a cell per acceptance spec and draft length."""
    B = len(rows)
    plain = measure.engine_run(target, None, rows, args.tokens, 0)  # warm-up and the continuations
    entry["plain_same_each_run"] = (
        measure.engine_run(target, None, rows, args.tokens, 0).tokens == plain.tokens
    )
    if "baseline" in args.parts:
        _baseline(target, rows, plain.tokens, args, entry)
        save()
        print(_baseline_line(result, entry), flush=True)
    if "e2e" not in args.parts:
        return
    entry["cells"] = []
    for spec in specs(args):
        if len(spec.rows) > B:  # a mix needs a row of each kind
            print(
                f"{result['shape']} {result['bits']} B={B} {spec.name}: skipped (needs {len(spec.rows)} rows)"
            )
            continue
        cells = _cells(target, drafter, proposer, rows, plain.tokens, spec, args, result, warm)
        entry["cells"] += cells
        save()
        for cell in cells:
            print(_cell_line(result, cell), flush=True)


def _costs(target, proposer, B: int, args) -> dict:
    verify, alone = measure.verify_costs(target, args.context, B, range(1, args.max_l + 1), args.cost_trials)
    draft = measure.drafter_costs(target, proposer, args.context, B, args.cost_trials)
    return {"verify_ms": verify, "verify_alone_ms": alone, "drafter_ms": draft}


def _baseline(target, rows, plain_tokens, args, entry: dict) -> None:
    """Our batched plain decoding against mlx-lm's batched generation, in paired trials: the
    card's drift cancels in each pair's ratio, and which side goes first alternates."""
    model = measure.mlx_lm_model(target)
    measure.mlx_lm_run(model, rows, args.tokens)  # warm-up
    pairs = []
    for trial in range(args.trials):
        first, second = ("ours", "theirs") if trial % 2 == 0 else ("theirs", "ours")
        runs = {}
        for who in (first, second):
            runs[who] = (
                measure.engine_run(target, None, rows, args.tokens, 0)
                if who == "ours"
                else measure.mlx_lm_run(model, rows, args.tokens)
            )
        pairs.append((runs["ours"], runs["theirs"]))
    # bf16 rounding differs between two implementations: record where the outputs part.
    entry["mlx_lm_same_tokens"] = min(map(measure.common_prefix, pairs[0][1].tokens, plain_tokens))
    entry["plain_tokens_per_s"] = statistics.median(ours.tokens_per_s for ours, _ in pairs)
    entry["plain_ms_per_row_token"] = statistics.median(ours.ms_per_row_token for ours, _ in pairs)
    entry["plain_peak_gb"] = max(ours.peak_gb for ours, _ in pairs)
    entry["mlx_lm_tokens_per_s"] = statistics.median(theirs.tokens_per_s for _, theirs in pairs)
    entry["mlx_lm_peak_gb"] = max(theirs.peak_gb for _, theirs in pairs)
    entry["plain_vs_mlx_lm"] = statistics.median(
        ours.tokens_per_s / theirs.tokens_per_s for ours, theirs in pairs
    )


def _cells(target, drafter, proposer, rows, plain_tokens, spec, args, result, warm: set) -> list[dict]:
    """Every draft length of `args.ks` at one acceptance spec and batch: paired trials against
    batched plain, each trial running plain and every draft length in turn (the order turning
    from trial to trial), so that a cell's ratio and the ratios between draft lengths all come
    from the same minutes of the card. `warm`: the (batch, k) already run (the first cell of each
    warms up: traces, kernels, auto's costs; a fixed k's shapes at another acceptance need none)."""
    B, n, vocab = len(rows), args.tokens, target.args.vocab_size
    chances = spec.chances(B)
    ks = {name: parse_k(name) for name in args.ks}
    kept: list[Auto] = []  # KEPT's one policy in this cell

    def auto(rules: Rules | None = None) -> Auto:  # on the costs "auto" reads (`draft_length`)
        return Auto(load_costs(target, drafter, batch_sizes(B)), rules)

    def policy(k):
        if isinstance(k, tuple):
            return Cycle(k)
        if k == KEPT:
            kept[:] = kept or [auto()]
            return kept[0]
        if isinstance(k, str) and k.startswith("auto:"):  # a fresh one each run, as "auto" is
            return auto(auto_rules(k))
        return k

    def speculative(k, seed: int):
        hits = draw_hits(chances, n, seed)

        def run(fed):
            propose = replay_proposer(proposer, replay_table(fed, hits, vocab), [len(r) for r in rows])
            return measure.engine_run(target, drafter, rows, n, policy(k), propose=propose)

        return replay_settled(run, plain_tokens)

    # A policy drafts other lengths at another acceptance: it warms up at each (auto at alpha 0
    # drafts little, and its first run at 0.8 would compile its long verifies inside a trial).
    for k in ks.values():
        key = (B, k, spec.name) if isinstance(k, str) else (B, k)  # a policy
        if key not in warm:
            speculative(k, args.trials)  # on a seed no trial uses
            warm.add(key)
    plain, runs, passes = [], {name: [] for name in ks}, {name: [] for name in ks}
    sides = [None, *ks]  # None: plain
    for trial in range(args.trials):  # each trial draws its own hits (seed = trial, alike for every k)
        turn = trial % len(sides)
        for side in sides[turn:] + sides[:turn]:
            if side is None:
                plain.append(measure.engine_run(target, None, rows, n, 0))
                continue
            run, settled_in = speculative(ks[side], trial)
            runs[side].append(run)
            passes[side].append(settled_in)
    cells = []
    for name, k in ks.items():
        label = name if isinstance(k, tuple) else k  # a cycle by its --ks spelling
        cell = {"batch": B} | _cell_stats(spec.name, label, plain, runs[name], plain_tokens)
        cell["replay_passes"] = max(passes[name])
        costs = result["costs"].get(str(B))
        cell |= _at_expectation(cell, chances)
        if costs is not None:
            cell |= _ideal(chances, k, costs, cell["speedup"], args.max_l)
            cell |= _against_surface(cell, costs)
            if "speedup_at_expected" in cell and "ideal" in cell:
                cell["of_ideal_at_expected"] = cell["speedup_at_expected"] / cell["ideal"]
        cells.append(cell)
    return cells


def _at_expectation(cell: dict, chances: list[list[float]]) -> dict:
    """The cell with its draws' luck taken out, where every row has the same chances: the drafts
    its draft lengths keep on average (Leviathan's expectation, per row-round that drafted), and
    its speedup had it kept that many (its rounds' times as run; rounds scale with tokens a
    row-round). A fixed k and auto then compare without one trial's lucky run of hits (r52: k =
    8 kept 3.46 a round where 3.31 was due)."""
    if any(c != chances[0] for c in chances):
        return {}  # a ragged mix: the rounds' k by row is not recorded
    lengths = {int(k): count for k, count in cell["row_rounds_by_k"].items()}
    drafting = sum(count for k, count in lengths.items() if k)
    if not drafting:
        return {}
    expected = sum(count * (measure.expected_tokens(chances[0], k) - 1) for k, count in lengths.items())
    row_rounds = sum(lengths.values())
    kept = cell["accepted_per_round"] * drafting
    return {
        "expected_accepted_per_round": expected / drafting,
        "speedup_at_expected": cell["speedup"] * (row_rounds + expected) / (row_rounds + kept),
    }


def _rounds_ms(runs: list) -> float:
    """The median over runs of ms per step read back (an engine step reads one round)."""
    return statistics.median(r.seconds * 1e3 / r.steps for r in runs)


def _against_surface(cell: dict, costs: dict) -> dict:
    """A round's ms as run against what the cost surface says rounds of the cell's draft
    lengths cost (their mean over row-rounds, a plain step's for plain decoding): the ratio
    over plain's is what the cell's rounds cost beyond the surface, e.g. for changing shape."""
    verify, draft = costs["verify_ms"], costs["drafter_ms"]["step"]
    lengths = {int(k): count for k, count in cell["row_rounds_by_k"].items()}
    if any(str(k + 1) not in verify for k in lengths):
        return {}
    surface = sum(count * measure.round_ms(verify, draft, k) for k, count in lengths.items())
    surface /= sum(lengths.values())
    ratio, plain = cell["ms_per_round"] / surface, cell["plain_ms_per_round"] / verify["1"]
    return {"surface_ms_per_round": surface, "round_vs_surface": ratio, "beyond_plain": ratio / plain}


def _tail(runs: list) -> dict:
    """The median over runs with a tail (rows ending apart) of its steps' median ms and count."""
    tails = [r for r in runs if r.tail_step_ms is not None]
    if not tails:
        return {}
    return {
        "tail_step_ms": statistics.median(r.tail_step_ms for r in tails),
        "tail_steps": statistics.median(r.tail_steps for r in tails),
    }


def _cell_stats(name: str, k, plain: list, runs: list, plain_tokens) -> dict:
    """Speedups while the batch is full (what the ideal models; plain's rows all finish at its
    last step) and to the last token (a fixed-length batch's tail of slow rows included)."""
    speedups = [r.full_tokens_per_s / p.full_tokens_per_s for p, r in zip(plain, runs)]
    to_last = [r.tokens_per_s / p.tokens_per_s for p, r in zip(plain, runs)]
    drafted, accepted, rounds = (sum(getattr(r, f) for r in runs) for f in ("drafted", "accepted", "rounds"))
    lengths = [sum(column) for column in zip(*(r.draft_lengths for r in runs))]
    return {
        "acceptance": name,
        "k": k,
        "speedup": statistics.median(speedups),
        "speedup_to_last": statistics.median(to_last),
        "tokens_per_s": statistics.median(r.full_tokens_per_s for r in runs),
        "plain_tokens_per_s": statistics.median(p.full_tokens_per_s for p in plain),
        "tokens_per_s_to_last": statistics.median(r.tokens_per_s for r in runs),
        "ms_per_row_token": statistics.median(r.ms_per_row_token for r in runs),
        # (plain, ours) per pair, while the batch is full
        "trials_tokens_per_s": [[p.full_tokens_per_s, r.full_tokens_per_s] for p, r in zip(plain, runs)],
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "accepted_per_round": accepted / rounds if rounds else 0.0,  # per row-round that drafted
        "accepted_per_trial": [r.accepted for r in runs],
        "row_rounds_by_k": {str(i): count for i, count in enumerate(lengths) if count},
        "shadows_per_trial": [r.shadows for r in runs],  # plain steps of the batch with a shadow
        "ms_per_round": _rounds_ms(runs),
        "plain_ms_per_round": _rounds_ms(plain),
        # A step's ms while every row decoded, and after the first row ended (fewer rows)
        "full_step_ms": statistics.median(r.full_step_ms for r in runs),
        **_tail(runs),
        # Of a run's time, the share its read-backs waited for the device: near 1 the device
        # bounds the rounds, lower the host's own work per round does.
        "device_share": statistics.median(r.waited / r.seconds for r in runs),
        "plain_device_share": statistics.median(p.waited / p.seconds for p in plain),
        "peak_gb": max(r.peak_gb for r in runs),
        "plain_peak_gb": max(p.peak_gb for p in plain),
        "same_as_plain": min(
            measure.common_prefix(a, b) for r in runs for a, b in zip(r.tokens, plain_tokens)
        ),
        **_beliefs(runs),
    }


def _beliefs(runs: list) -> dict:
    """Auto's: what a round of the batch cost at k = 0..MAX_DRAFT by its cost model at the end
    of its runs (the median over runs) and by the measured costs it started from, in ms: beside
    the fixed-k cells' `ms_per_round`, whether it knew what rounds cost."""
    if not runs or runs[0].believed_ms is None:
        return {}
    return {
        "believed_ms_by_k": [statistics.median(ms) for ms in zip(*(r.believed_ms for r in runs))],
        "calibrated_ms_by_k": runs[0].calibrated_ms,
    }


def _ideal(chances, k, costs: dict, speedup: float, max_l: int) -> dict:
    """Leviathan's ideal over batched plain from this run's batched costs: at this fixed k,
    or the best fixed k for a policy. The surface of pipelined forwards prices it; "alone": the
    same from forwards timed alone (host time and the wait included: the earlier cards' ideal,
    kept to compare with them)."""
    if isinstance(k, int) and k + 1 > max_l:
        return {}
    draft = costs["drafter_ms"]["step"]
    out = {}
    for suffix, verify in (("", costs["verify_ms"]), ("_alone", costs["verify_alone_ms"])):
        if isinstance(k, int):
            ideal_k = k
            ideal = measure.ideal_speedup(chances, k, verify["1"], measure.round_ms(verify, draft, k))
        else:
            ideal_k, ideal = measure.best_ideal(chances, verify, draft)
        out |= {f"ideal{suffix}": ideal, f"ideal_k{suffix}": ideal_k, f"of_ideal{suffix}": speedup / ideal}
    return out


def _cost_line(result: dict, B: int) -> str:
    costs = result["costs"][str(B)]
    verify = " ".join(f"L{L}={ms:.1f}" for L, ms in costs["verify_ms"].items())
    alone = " ".join(f"L{L}={ms:.1f}" for L, ms in costs["verify_alone_ms"].items())
    return (
        f"{result['shape']} {result['bits']} B={B} cost ms, pipelined: {verify} | alone: {alone} "
        f"| drafter step {costs['drafter_ms']['step']:.2f}"
    )


def _baseline_line(result: dict, entry: dict) -> str:
    return (
        f"{result['shape']} {result['bits']} B={entry['batch']} plain {entry['plain_tokens_per_s']:.1f} tok/s "
        f"({entry['plain_ms_per_row_token']:.2f} ms/row-token), mlx-lm {entry['mlx_lm_tokens_per_s']:.1f} tok/s: "
        f"ours {entry['plain_vs_mlx_lm']:.3f}x; peak {entry['plain_peak_gb']:.2f} / {entry['mlx_lm_peak_gb']:.2f} GB"
    )


def _cell_line(result: dict, cell: dict) -> str:
    detail = (
        f" ideal {cell['ideal']:.2f}x (k={cell['ideal_k']}, {cell['of_ideal']:.0%}; from forwards alone"
        f" {cell['ideal_alone']:.2f}x, k={cell['ideal_k_alone']}, {cell['of_ideal_alone']:.0%})"
        if "ideal_alone" in cell
        else ""
    )
    if "speedup_at_expected" in cell:
        detail += (
            f", {cell['speedup_at_expected']:.2f}x at the expected "
            f"{cell['expected_accepted_per_round']:.2f} accepted/round"
        )
    if "beyond_plain" in cell:
        detail += (
            f", rounds {cell['ms_per_round']:.1f} ms ({cell['beyond_plain']:.2f}x the surface's, as plain)"
        )
    detail += f", waiting for the device {cell['device_share']:.0%} (plain {cell['plain_device_share']:.0%})"
    if any(cell.get("shadows_per_trial", ())):
        detail += f", shadows {statistics.median(cell['shadows_per_trial']):.0f} a run"
    if "tail_step_ms" in cell:
        detail += (
            f", steps {cell['full_step_ms']:.1f} ms with every row, {cell['tail_step_ms']:.1f} ms "
            f"after the first ended (x{cell['tail_steps']:.0f})"
        )
    return (
        f"{result['shape']} {result['bits']} B={cell['batch']} {cell['acceptance']} k={cell['k']}: "
        f"{cell['speedup']:.2f}x{detail}, {cell['speedup_to_last']:.2f}x to the last token, "
        f"{cell['tokens_per_s']:.1f} tok/s, {cell['accepted_per_round']:.2f} accepted/round, "
        f"peak {cell['peak_gb']:.2f} / {cell['plain_peak_gb']:.2f} GB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.quick:
        _quick(args)
    _check(parser, args)
    if args.context is None:
        args.context = args.prompt + args.tokens // 2
    report = {
        "environment": environment(),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    home = costs_module.COST_DIR
    costs_module.COST_DIR = args.costs or home  # where every auto of this run reads its costs
    try:
        for shape in args.shapes:
            for bits in args.bits:
                result: dict = {}
                report["results"].append(result)
                bench_shape(shape, bits, args, result, save)
                save()
                mx.clear_cache()
    finally:
        costs_module.COST_DIR = home
    try:
        from .plots import plot_report
    except ImportError:  # matplotlib is the `bench` extra
        print("matplotlib not installed: no plots", file=sys.stderr)
    else:
        plot_report(report, args.out.with_suffix(""))
    return 0
