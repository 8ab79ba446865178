"""Where a speculative round's time goes beyond the cost curve: the real loop against
stripped-down loops over the same model (all greedy, ms per token, replayed acceptance alpha).

"read back each round" runs the same loop with a logits processor that changes nothing: a
processor needs the history on the host, so every round is read back before the next one is
built; the difference to the plain "loop" row is what pipelining the rounds saves.

    python -m bench.overhead --shape E2B --alphas 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import mlx.core as mx

from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.speculative import MAX_DRAFT, Draft, DraftStats, greedy, prefill, speculative_tokens

from . import measure
from .models import build


def _per_token(tokens, n: int) -> float:
    next(tokens)
    start = time.perf_counter()
    generated = sum(1 for _ in itertools.islice(tokens, n - 1))
    elapsed = time.perf_counter() - start
    tokens.close()
    return elapsed * 1e3 / generated


def _bare_verify_loop(target, prompt, k: int, n: int) -> float:
    """Verify k+1 tokens, read the argmax, rewind k: the loop with nothing but the forward."""
    cache = target.make_cache(MAX_DRAFT + 1)
    prefill(target, prompt, cache)
    tokens = mx.zeros((1, k + 1), mx.int32)
    mx.eval([c.state for c in cache])
    start = time.perf_counter()
    for _ in range(n):
        greedy(target, target(tokens, cache))[0].tolist()
        for c in cache:
            c.trim(k)
    return (time.perf_counter() - start) * 1e3 / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--ks", nargs="+", type=int, default=[1, 3])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0])
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    target, drafter = build(args.shape, bits=args.bits)
    prompt = measure.random_tokens(256, target.args.vocab_size, seed=3)
    n = args.tokens
    plain = measure.plain_run(target, prompt, n + MAX_DRAFT + 1)
    rows = {"plain": min(measure.plain_run(target, prompt, n).ms_per_token for _ in range(3))}
    read_back = make_sampling(logits_processors=[lambda tokens, logits: logits])

    def loop(propose, k, sampling=None):
        runs = [
            _per_token(speculative_tokens(
                target, prompt, target.make_cache(MAX_DRAFT + 1), propose, k, n, DraftStats(),
                **({} if sampling is None else {"sampling": sampling}),
            ), n)
            for _ in range(4)
        ]  # fmt: skip
        return min(runs[1:])

    for k in args.ks:
        for alpha in args.alphas:
            real = measure.replay_proposer(drafter, target, plain.tokens, alpha, 0)
            rows[f"k={k} a={alpha} loop, drafter"] = loop(real, k)
            rows[f"k={k} a={alpha} loop, drafter, read back each round"] = loop(real, k, read_back)

        def constant(request, cache):
            return Draft(tokens=mx.zeros((1, request.k), mx.int32))

        rows[f"k={k} a=0 loop, no drafter"] = loop(constant, k)
        rows[f"k={k} bare verify"] = min(_bare_verify_loop(target, prompt, k, n) for _ in range(4))
    for name, ms in rows.items():
        print(f"{args.shape} {args.bits or 'bf16'} {name:48s} {ms:7.2f} ms/token", flush=True)
    print(json.dumps(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "bits": args.bits, "tokens": n, "ms_per_token": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
