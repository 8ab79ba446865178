"""What rows leaving and joining cost the engine's next steps, with held slots and without.

One engine of `--batch` rows (random `--prompt`-token prompts, greedy, a fixed k of `--ks`, the
model's own random drafter: the steps' work, not their acceptance, is what is timed) is stepped
until warm; then each event below happens `--events` times, `--gap` steps apart, and the steps
after it are timed against the steady steps before the first (medians, ms):

- "leave": a row is cancelled and no request comes (a fixed batch's rows ending one by one);
- "leave and join": a row is cancelled and a request added before the next step (a caller that
  refills in process);
- "late join": a row is cancelled and a request added a step later (a server's client whose
  next request comes back over HTTP after the worker queued the next round);
- "switch k": one round drafts `--switch` instead of k, every row staying (with k = 0, what
  auto's probe of a useless drafter costs beyond its own round).

Every case runs with each `--holds` (the engine's `hold_steps`: 0 lets a finished row's slot go
at once, the batch shrinking; 8 is the default), on a fresh engine each ("switch k", where no
row leaves, with the first only). A "leave" shrinks the batch by one per event without held
slots; with them, the slots go together once half the rows are held (or after `hold_steps`
steps).

    python -m bench.churn --shape E2B --batch 8 --ks 8 0 --holds 8 0 --out churn.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx

from mlx_gemma_mtp.draft_length import MAX_DRAFT, Fixed
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.sample import GREEDY

from . import environment
from .models import build

WARM = 30  # steps before anything is timed (kernels, traces)
STEADY = 10  # steps timed before the first event
EVENTS = ("leave", "leave and join", "late join", "switch k")


@dataclass
class _Switching(Fixed):
    """A fixed k, but `once` for the next round when set."""

    once: int | None = None

    def choose(self, limit: int, rows) -> int:
        k, self.once = (self.k if self.once is None else self.once), None
        return min(k, limit)


def churn(
    target,
    drafter,
    *,
    batch: int,
    k: int,
    hold: int,
    event: str,
    events: int,
    gap: int,
    prompt: int,
    switch: int = 1,
) -> dict:
    """One case on a fresh engine: steady step ms, per step after an event its median over the
    events (ms), and the batch's slots once each event's steps ran."""
    rng = random.Random(0)
    vocab = target.args.vocab_size

    def request() -> Request:
        tokens = [rng.randrange(4, vocab) for _ in range(prompt)]
        return Request(prompt=tokens, max_tokens=1 << 20, sampling=GREEDY, stop_ids=frozenset())

    policy = _Switching(k)
    engine = Engine(target, drafter, num_draft_tokens=policy, max_batch=batch, hold_steps=hold)
    rows = [engine.add(request()) for _ in range(batch)]  # oldest first; none ends by itself

    usage = {}  # row -> its latest usage

    def step() -> float:
        start = time.perf_counter()
        events = engine.step()
        ms = (time.perf_counter() - start) * 1e3
        usage.update((e.rid, e.usage) for e in events)
        return ms

    for _ in range(WARM):
        step()
    steady = [step() for _ in range(STEADY)]
    after, shapes = [], []
    for _ in range(events):
        if event == "switch k":
            policy.once = switch
        else:
            engine.cancel(rows.pop(0))
        if event == "leave and join":
            rows.append(engine.add(request()))
        times = [step()]
        if event == "late join":
            rows.append(engine.add(request()))
        times += [step() for _ in range(gap - 1)]
        after.append(times)
        shapes.append(engine.slots)
    return {
        "batch": batch,
        "k": k,
        "hold_steps": hold,
        "event": event if event != "switch k" else f"switch k to {switch}",
        "steady_ms": statistics.median(steady),
        "after_ms": [statistics.median(column) for column in zip(*after)],
        "slots_after_each_event": shapes,
        # every row's rounds by the k they drafted (0: plain steps), the warm-up's included
        "row_rounds_by_k": [sum(column) for column in zip(*(u.draft_lengths for u in usage.values()))],
    }


def line(case: dict) -> str:
    after = " ".join(f"{ms:6.1f}" for ms in case["after_ms"])
    return (
        f"k={case['k']:<2} hold {case['hold_steps']}: {case['event']:16s} steady {case['steady_ms']:6.1f} ms,"
        f" steps after it {after} (slots {case['slots_after_each_event']})"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 0], help="fixed draft lengths (0: plain)")
    p.add_argument("--holds", type=int, nargs="+", default=[8, 0], help="the engine's hold_steps")
    p.add_argument("--switch", type=int, default=1, help="the k of the one round a 'switch k' event drafts")
    p.add_argument("--events", type=int, default=3, help="of each kind, per case")
    p.add_argument("--gap", type=int, default=6, help="steps timed after each event")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--out", help="also write the cases to this JSON file")
    args = p.parse_args(argv)
    if not 1 <= args.events < args.batch:
        p.error(
            f"--events {args.events} must be 1 or more and below --batch {args.batch}: each leave takes a row"
        )
    if args.gap < 1:
        p.error(f"--gap {args.gap} must be 1 or more steps")
    for k in [*args.ks, args.switch]:
        if not 0 <= k <= MAX_DRAFT:
            p.error(f"draft length {k} (--ks, --switch) must be in 0..{MAX_DRAFT}")
    if min(args.holds) < 0:
        p.error(f"--holds {args.holds}: hold_steps must be 0 or more")
    target, drafter = build(args.shape, bits=args.bits)
    cases = []
    for k in args.ks:
        for event in EVENTS:
            for hold in args.holds if event != "switch k" else args.holds[:1]:
                case = churn(
                    target, drafter, batch=args.batch, k=k, hold=hold, event=event,
                    events=args.events, gap=args.gap, prompt=args.prompt, switch=args.switch,
                )  # fmt: skip
                cases.append(case)
                print(line(case), flush=True)
                mx.clear_cache()
    if args.out:
        report = {"environment": environment(), "shape": args.shape, "bits": args.bits, "prompt": args.prompt}
        report["cases"] = cases
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
