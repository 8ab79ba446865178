"""When each token came out: plain decoding, mlx-lm's generate_step, and the speculative loop
(k = 0 and auto, replayed acceptance alpha) on one model, run after run in turn (the order
reversed every other turn), every yield timestamped. Where auto loses to plain at alpha = 0,
the slow yields say which rounds cost it.

    python -m bench.timeline --shape 31B --bits 4 --alpha 0 --runs 5 --out timeline.json

Prints per variant the median ms per token, the median over turns of plain's time over its
own, and, of its median run, the yields that took over 1.5x that run's median (index, ms).
The JSON holds every run's per-yield ms and which yields were kept drafts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from mlx_gemma_mtp.costs import load_costs
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.speculative import DraftStats

from . import measure
from .models import build

SLOW = 1.5  # a yield over this times its run's median is listed


def yield_times(tokens, n: int) -> tuple[list[int], list[float], list[bool]]:
    """The first n tokens of a (token, from_draft) generator, the ms before each yield after
    the first (the prefill's), and whether each of those was a kept draft."""
    out = [next(tokens)[0]]
    ms, drafted, last = [], [], time.perf_counter()
    for token, from_draft in itertools.islice(tokens, n - 1):
        now = time.perf_counter()
        out.append(token)
        ms.append((now - last) * 1e3)
        drafted.append(from_draft)
        last = now
    tokens.close()
    return out, ms, drafted


def variants(target, drafter, prompt, continuation: list[int], alpha: float, stats: dict) -> dict:
    """name -> a function making a fresh (token, from_draft) generator; the loop's variants
    put their run's DraftStats in `stats[name]`."""
    n = len(continuation)

    def loop(name, k):
        def make():
            policy = draft_length(k, target, drafter) if isinstance(k, str) else k
            stats[name] = DraftStats()
            return measure.replay_generator(
                target, drafter, prompt, continuation, alpha, policy, n, stats[name]
            )

        return make

    return {
        "plain": lambda: measure.plain_generator(target, prompt),
        "mlx-lm": lambda: measure.mlx_lm_generator(target, prompt, n),
        "k=0": loop("k=0", 0),
        "auto": loop("auto", "auto"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", help="also write every run's per-yield ms to this JSON file")
    args = p.parse_args(argv)
    target, drafter = build(args.shape, bits=args.bits)
    prompt = measure.random_tokens(256, target.args.vocab_size, seed=3)
    n = args.tokens
    continuation = measure.plain_run(target, prompt, n).tokens
    last_stats = {}  # the loop's variants: name -> DraftStats of their last run
    makers = variants(target, drafter, prompt, continuation, args.alpha, last_stats)
    for make in makers.values():  # warm-up: kernels, auto's costs
        yield_times(make(), n)
    runs = {name: [] for name in makers}  # per variant, per run: the ms of each yield
    drafts = {name: [] for name in makers}  # ... and whether it was a kept draft
    round_logs = {"auto": []}  # per run: each drafting round (tokens before it, k, accepted)
    orders = []  # per turn, the variants in the order they ran
    for turn in range(args.runs):
        # In turn, so a drift lands on every variant alike, and in reverse order every other
        # turn, so a place in the turn does too (E4B 4-bit, plain always first: k = 0 and
        # mlx-lm, doing plain's work, read 0.91x and 0.90x in r29).
        orders.append(list(makers) if turn % 2 == 0 else list(makers)[::-1])
        for name in orders[-1]:
            tokens, ms, drafted = yield_times(makers[name](), n)
            assert name == "mlx-lm" or tokens == continuation, f"{name}: output differs from plain"
            runs[name].append(ms)
            drafts[name].append(drafted)
            if name in round_logs:
                round_logs[name].append(last_stats[name].round_log)
    costs = load_costs(target, drafter)  # what auto started from (measured in the warm-up)
    print("auto's round costs, ms:", [round(costs.round(k) * 1e3, 1) for k in range(len(costs.verify))], flush=True)
    for name, all_ms in runs.items():
        totals = [sum(ms) for ms in all_ms]
        median_run = all_ms[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
        per_token = statistics.median(totals) / (n - 1)
        typical = statistics.median(median_run)
        slow = [(i, round(ms, 1)) for i, ms in enumerate(median_run) if ms > SLOW * typical]
        ratio = statistics.median(sum(p) / total for p, total in zip(runs["plain"], totals))  # per turn
        print(f"{name:7s} {per_token:6.2f} ms/token ({ratio:.3f}x plain in its turn)  slow yields: {slow}", flush=True)
    if args.out:
        report = {"shape": args.shape, "bits": args.bits, "alpha": args.alpha, "loop_costs_ms": measure.costs_ms(costs)}
        with open(args.out, "w") as f:
            json.dump(report | {"yield_ms": runs, "from_draft": drafts, "round_log": round_logs, "order": orders}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
