"""When each step's tokens came out: our batched plain decoding, mlx-lm's batched generation and
the engine with auto (and fixed `--ks`) at a replayed acceptance (`--alpha`, or any
`--acceptance` spec such as ragged=0.9/0.2) on one model and batch, run after run in turn (the
order reversed every other turn), every step timestamped. Where auto loses to plain at alpha = 0,
the slow steps say which rounds cost it; where a batch's rows end apart, the steps by rows say
what its tail of fewer rows cost.

    python -m bench.timeline --shape 31B --bits 4 --batch 4 --alpha 0 --runs 5 --out timeline.json
    python -m bench.timeline --shape E2B --batch 4 --acceptance ragged=0.9/0.2 --ks 8 --tokens 256

Prints per variant the median ms per row-token, the median over turns of plain's time over its
own (to the last token), and, of its median run, the median step by the rows it served and the
steps that took over 1.5x that run's median (index, ms); per drafting variant its first choices
in each run and its rounds' own-share timings by k (`policy_lines`). The JSON holds every run's
per-step ms, tokens, kept drafts and rows (all rows together), and every drafting variant's
policy calls in order (`Recorded`: each choice with its rows and limit, each round's kept drafts
and timing) with auto's calibrated costs, so that `beliefs` can replay auto offline and say what
it believed each k would yield and cost when it chose.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import mlx.core as mx

from mlx_gemma_mtp.draft_length import MAX_DRAFT, Auto, Costs, DraftLength, Fixed
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.speculative import drafter_proposer

from . import environment, measure
from .models import build
from .replay import draw_hits, parse_acceptance, replay_proposer, replay_table

SLOW = 1.5  # a step over this times its run's median is listed


class Recorded:
    """A draft-length policy that passes every call on and records it, in order: `("choose",
    limit, rows, k)`, `("observe", k, [[row, kept], ...])`, `("observe_time", k, batch, seconds,
    own)`, `("forget", row)`. Auto is deterministic in its calls, so `beliefs` can replay them."""

    def __init__(self, policy: DraftLength):
        self.policy, self.calls = policy, []

    def choose(self, limit, rows):
        k = self.policy.choose(limit, rows)
        self.calls.append(("choose", limit, list(rows), k))
        return k

    def observe(self, k, accepted):
        self.policy.observe(k, accepted)
        self.calls.append(("observe", k, [[row, kept] for row, kept in accepted.items()]))

    def observe_time(self, k, batch, seconds, own=None):
        self.policy.observe_time(k, batch, seconds, own)
        self.calls.append(("observe_time", k, batch, seconds, own))

    def shadow(self):
        return self.policy.shadow()

    def forget(self, row):
        self.policy.forget(row)
        self.calls.append(("forget", row))


def beliefs(calls: list, costs: Costs) -> list[dict]:
    """A fresh `Auto` on `costs` fed a recorded auto's `calls` (JSON-loaded or not): per choice,
    its k and what it believed of each k = 0..limit then (`expected` tokens summed over the rows,
    `ms` a round). A ValueError where the replay chooses otherwise than the record (the calls
    are not auto's on these costs)."""
    auto, out = Auto(costs), []
    for call in calls:
        kind, *args = call
        if kind == "choose":
            limit, rows, k = args
            horizon = min(limit, MAX_DRAFT)
            expected = auto.acceptance.expected(horizon, rows) if rows else []
            ms = [auto.cost.seconds(j, len(rows)) * 1e3 for j in range(horizon + 1)] if rows else []
            again = auto.choose(limit, rows)
            if again != k:
                raise ValueError(f"choice {len(out)}: the replay chose {again}, the record {k}")
            out.append({"k": k, "rows": len(rows), "expected": expected, "ms": ms})
        elif kind == "observe":
            auto.observe(args[0], {row: kept for row, kept in args[1]})
        elif kind == "observe_time":
            auto.observe_time(*args)
        elif kind == "forget":
            auto.forget(*args)
        else:
            raise ValueError(f"unknown call {kind!r}")
    return out


def variants(target, drafter, prompts, continuations, acceptance: str, ks=(), calls=None) -> dict:
    """name -> run(steps) -> measure.Run, each appending its steps' (ms, tokens, kept, rows):
    plain, mlx-lm, auto and each fixed k of `ks`, drafting at `acceptance` (`parse_acceptance`).
    calls: gets, per drafting variant, each run's recorded policy calls (`Recorded`; the warm-up
    run's first, then one per run of `steps`), and under "costs" the costs auto was calibrated with."""
    n, vocab = len(continuations[0]), target.args.vocab_size
    real = drafter_proposer(drafter, target)
    hits = draw_hits(parse_acceptance(acceptance).chances(len(prompts)), n, seed=0)
    propose = replay_proposer(real, replay_table(continuations, hits, vocab), [len(p) for p in prompts])
    model = measure.mlx_lm_model(target)
    calls = {} if calls is None else calls

    def drafting(k):
        def run(steps):
            policy = draft_length("auto", target, drafter, len(prompts)) if k == "auto" else Fixed(k)
            if isinstance(policy, Auto):
                calls["costs"] = policy.cost.costs.to_json()
            recorded = Recorded(policy)
            result = measure.engine_run(target, drafter, prompts, n, recorded, propose=propose, steps=steps)
            calls.setdefault("auto" if k == "auto" else f"k={k}", []).append(recorded.calls)
            return result

        return run

    out = {
        "plain": lambda steps: measure.engine_run(target, None, prompts, n, 0, steps=steps),
        "mlx-lm": lambda steps: measure.mlx_lm_run(model, prompts, n, steps=steps),
        "auto": drafting("auto"),
    }
    return out | {f"k={k}": drafting(k) for k in ks}


def turns(makers: dict, continuations, runs: int) -> tuple[dict, list]:
    """Every variant once as a warm-up (kernels, auto's costs), then `runs` turns, the order
    reversed every other turn (E4B 4-bit with plain always first: the variants doing plain's
    work read 0.90-0.91x); per variant and run its steps, and each turn's order."""
    for make in makers.values():
        make([])
    steps = {name: [] for name in makers}
    orders = []
    for turn in range(runs):
        orders.append(list(makers) if turn % 2 == 0 else list(makers)[::-1])
        for name in orders[-1]:
            mine = []
            run = makers[name](mine)
            # On MLX CUDA a k-row verify may flip a near tie (see replay.replay_settled): said, not fatal.
            if name != "mlx-lm" and run.tokens != continuations:
                assert mx.default_device() != mx.cpu, f"{name}: output differs from plain on the CPU backend"
                print(f"{name}, turn {turn}: output differs from plain (a near tie flipped)", flush=True)
            steps[name].append(mine)
    return steps, orders


def report_lines(steps: dict) -> list[str]:
    """Per variant: ms per row-token and its speed over plain's in the same turn (to the last
    token), then of its median run the median step by the rows it served (a batch whose rows end
    apart runs a tail of fewer rows) and the slow steps."""
    lines = []
    for name, runs in steps.items():
        totals = [sum(step[0] for step in run) for run in runs]
        tokens = [sum(step[1] for step in run) for run in runs]
        median_run = runs[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
        typical = statistics.median(step[0] for step in median_run)
        slow = [(i, round(step[0], 1)) for i, step in enumerate(median_run) if step[0] > SLOW * typical]
        by_rows: dict[int, list[float]] = {}
        for ms, _, _, rows in median_run:
            by_rows.setdefault(rows, []).append(ms)
        rows = ", ".join(
            f"{r}: {statistics.median(v):.1f} ms x{len(v)}" for r, v in sorted(by_rows.items(), reverse=True)
        )
        plain = [sum(step[0] for step in run) for run in steps["plain"]]
        ratio = statistics.median(p / total for p, total in zip(plain, totals))  # per turn
        per_token = statistics.median(total / t for total, t in zip(totals, tokens))
        lines.append(
            f"{name:7s} {per_token:6.2f} ms/row-token ({ratio:.3f}x plain in its turn); "
            f"steps by rows {rows}; slow steps: {slow}"
        )
    return lines


def policy_lines(calls: dict, batch: int, opening: int = 8) -> list[str]:
    """Per drafting variant, from its recorded calls (the warm-up run left out): its first
    `opening` choices in each run, and the own-share timings of its rounds of the full batch by
    k, pooled over the runs: median ms, count, and the sd of their log about their own run's
    median for that k (the card's per-round jitter, `simulate.Noise.jitter`)."""
    lines = []
    for name, runs in calls.items():
        if name == "costs":
            continue
        choices = [[call[3] for call in run if call[0] == "choose"] for run in runs[1:]]
        opens = " / ".join(" ".join(map(str, ks[:opening])) for ks in choices)
        timed: dict[int, list[float]] = {}
        spread: dict[int, list[float]] = {}
        for run in runs[1:]:
            mine: dict[int, list[float]] = {}
            for call in run:
                if call[0] == "observe_time" and call[2] == batch and call[4] is not None:
                    mine.setdefault(call[1], []).append(call[4] * 1e3)
            for k, ms in mine.items():
                timed.setdefault(k, []).extend(ms)
                if len(ms) > 1:  # a lone timing is its own median: no spread to tell
                    centre = math.log(statistics.median(ms))
                    spread.setdefault(k, []).extend(math.log(m) - centre for m in ms)
        by_k = ", ".join(
            f"{k}: {statistics.median(ms):.1f} ms x{len(ms)}"
            + (f" (sd {statistics.pstdev(spread[k]):.3f})" if len(spread.get(k, ())) > 2 else "")
            for k, ms in sorted(timed.items())
        )
        lines.append(f"{name:7s} opens {opens}; own-share ms by k at B = {batch}: {by_k}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument(
        "--acceptance", help="a replayed acceptance spec in place of --alpha (e.g. ragged=0.9/0.2)"
    )
    p.add_argument("--ks", type=int, nargs="*", default=[], help="fixed draft lengths to run beside auto")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", help="also write every run's steps to this JSON file")
    args = p.parse_args(argv)
    target, drafter = build(args.shape, bits=args.bits)
    prompts = measure.random_prompts(args.batch, args.prompt, target.args.vocab_size, seed=3)
    continuations = measure.engine_run(target, None, prompts, args.tokens, 0).tokens
    acceptance = args.acceptance or f"alpha={args.alpha}"
    calls: dict = {}
    steps, orders = turns(
        variants(target, drafter, prompts, continuations, acceptance, args.ks, calls),
        continuations,
        args.runs,
    )
    for line in report_lines(steps) + policy_lines(calls, args.batch):
        print(line, flush=True)
    if args.out:
        report = {"environment": environment(), "shape": args.shape, "bits": args.bits, "batch": args.batch}
        report["acceptance"] = acceptance
        with open(args.out, "w") as f:
            json.dump(report | {"steps": steps, "order": orders, "calls": calls}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
