"""Where a speculative round's time goes beyond the cost surface: the engine against stripped-down
loops over the same model and batch (all greedy, ms per row-token, replayed acceptance alpha).

"read back each round" runs the same engine with a logits processor that changes nothing: a
processor needs the history on the host, so every drafting round is read back before the next
is queued; the difference to the plain "loop" row is what pipelining the rounds saves. "no
drafter" proposes constant tokens (the verify and the engine without drafting); "bare verify"
is the forward of k + 1 tokens per row, its argmax read back and the rows moved back, nothing
else.

    python -m bench.overhead --shape E2B --batch 4 --ks 1 3 --alphas 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

from mlx_gemma_mtp.sample import GREEDY, make_sampling
from mlx_gemma_mtp.speculative import MAX_DRAFT, Draft, drafter_proposer

from . import measure
from .models import build
from .replay import draw_hits, replay_proposer, replay_table

RUNS = 4  # per row, the best of the runs after the first (traces, kernels)


def _bare_verify(target, prompts, k: int, n: int) -> float:
    """ms per row-token of n forwards of k + 1 tokens per row, each read back, rows moved back."""
    rows = measure.filled_rows(target, prompts)
    context = len(prompts[0])
    tokens = mx.zeros((len(prompts), k + 1), mx.int32)
    start = time.perf_counter()
    for _ in range(n):
        measure.place(rows.cache, context, exact=k == 0)
        mx.argmax(target.logits(target(tokens, rows.cache)), axis=-1).tolist()
    return (time.perf_counter() - start) * 1e3 / (n * len(prompts))


def _constant(rows, k: int) -> Draft:
    return Draft(tokens=mx.zeros((len(rows.ids), k), mx.int32))


def overhead(target, drafter, prompts: list[list[int]], ks, alphas, n: int) -> dict[str, float]:
    plain = measure.engine_run(target, None, prompts, n, 0)
    real = drafter_proposer(drafter, target)
    read_back = make_sampling(logits_processors=[lambda tokens, logits: logits])

    def best(k: int, propose=None, sampling=GREEDY) -> float:
        """The engine's ms per row-token, the best run after the first."""
        mine = drafter if k else None
        runs = [measure.engine_run(target, mine, prompts, n, k, propose, sampling) for _ in range(RUNS)]
        return min(r.ms_per_row_token for r in runs[1:])

    rows = {"plain": best(0)}
    for k in ks:
        for alpha in alphas:
            hits = draw_hits([[alpha] * MAX_DRAFT] * len(prompts), n, seed=0)
            table = replay_table(plain.tokens, hits, target.args.vocab_size)
            propose = replay_proposer(real, table, [len(p) for p in prompts])
            rows[f"k={k} a={alpha} loop, drafter"] = best(k, propose)
            rows[f"k={k} a={alpha} loop, drafter, read back each round"] = best(k, propose, read_back)
        rows[f"k={k} a=0 loop, no drafter"] = best(k, _constant)
        rows[f"k={k} bare verify"] = min(_bare_verify(target, prompts, k, n) for _ in range(RUNS))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--ks", nargs="+", type=int, default=[1, 3])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0])
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    target, drafter = build(args.shape, bits=args.bits)
    prompts = measure.random_prompts(args.batch, args.prompt, target.args.vocab_size, seed=3)
    rows = overhead(target, drafter, prompts, args.ks, args.alphas, args.tokens)
    for name, ms in rows.items():
        print(
            f"{args.shape} {args.bits or 'bf16'} B={args.batch} {name:48s} {ms:7.2f} ms/row-token", flush=True
        )
    if args.out:
        report = {"shape": args.shape, "bits": args.bits, "batch": args.batch, "tokens": args.tokens}
        with open(args.out, "w") as f:
            json.dump(report | {"ms_per_row_token": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
