"""`python -m bench.forward_probe`: which target forwards of B rows x L new tokens run on this
backend, and what the ones that fail say.

MLX CUDA 0.32.4 failed a 26B-A4B forward at B = 16 (`cuGraphAddKernelNode(...) failed: invalid
argument`), which ends `python -m bench` there. This runs each (B, L) on its own after a
`--context`-token prefill per row, as the cost surface does (`measure.forward_ms`: host-known
positions at L = 1, device positions and masks above), records its time or its error, and goes
on. Like every bench tool it runs MLX CUDA without graphs (each kernel launched directly)
unless `MLX_USE_CUDA_GRAPHS=1` is in the environment: a failure that stays without graphs names
its kernel's launch, one that goes is the graph's. The JSON records that setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.cache import MAX_WRITE

from . import environment, measure
from .models import SHAPES, build


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.forward_probe", description=__doc__)
    p.add_argument("--shape", default="26B-A4B", choices=list(SHAPES) + ["tiny"])
    p.add_argument("--bits", default="4", choices=["bf16", "4", "8"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 16])
    p.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 5, 9, 17])
    p.add_argument("--context", type=int, default=1024, help="positions per row before each forward")
    p.add_argument("--out", type=Path, default=Path("bench/results/forward-probe.json"))
    return p


def probe(target, batch: int, lengths: list[int], context: int) -> dict[str, dict]:
    """{L: {"ms": ...} or {"error": ...}} for forwards of `batch` rows x L tokens."""
    vocab = target.args.vocab_size
    try:
        rows = measure.filled_rows(target, measure.random_prompts(batch, context, vocab, seed=1))
    except Exception as e:  # what the backend raises is the finding
        return {"prefill": {"error": f"{type(e).__name__}: {e}"}}
    out = {}
    for L in lengths:
        tokens = mx.array(measure.random_prompts(batch, L, vocab, seed=L))
        try:
            measure.forward_ms(target, rows.cache, tokens, context)  # the first compiles
            out[str(L)] = {"ms": measure.forward_ms(target, rows.cache, tokens, context)}
        except Exception as e:
            out[str(L)] = {"error": f"{type(e).__name__}: {e}"}
        print(f"B={batch} L={L}: {out[str(L)]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = setup_arg_parser()
    args = p.parse_args(argv)
    if any(not 1 <= L <= MAX_WRITE for L in args.lengths) or any(b < 1 for b in args.batches):
        p.error(f"--lengths must lie in 1..{MAX_WRITE} and --batches be at least 1")
    target, _ = build(args.shape, bits=None if args.bits == "bf16" else int(args.bits))
    report = {
        "environment": environment(),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "forwards": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        report["forwards"][str(batch)] = probe(target, batch, args.lengths, args.context)
        args.out.write_text(json.dumps(report, indent=1))
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
