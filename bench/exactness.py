"""Does a k-row verify compute what k one-row decodes compute, and does a row of a batch compute
what it computes alone, on this backend?

Greedy speculative decoding is exact only if the target's argmax at a position does not depend
on how many tokens the forward carries, and batched decoding only if it does not depend on the
other rows. Per op and per model, this measures the largest difference between row i of an
L-row computation and the same row computed alone, and between row 0 of a B-row plain step and
that row's step alone.

    python -m bench.exactness --shape E2B --dtypes bf16 f32 --batch 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma_mtp.speculative import MAX_DRAFT

from .measure import filled_rows, place, random_prompts
from .models import build

# name: (dtype, quantization bits)
DTYPES = {
    "bf16": (mx.bfloat16, None),
    "f16": (mx.float16, None),
    "f32": (mx.float32, None),
    "q4": (mx.bfloat16, 4),
}


def _max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def op_differences(dtype, hidden: int = 2048, rows: int = 4) -> dict[str, float]:
    """Row 0 of a `rows`-row op against the same op on row 0 alone."""
    x = mx.random.normal((1, rows, hidden)).astype(dtype)
    linear = nn.Linear(hidden, 4 * hidden, bias=False)
    linear.set_dtype(dtype)
    q = mx.random.normal((1, 8, rows, 256)).astype(dtype)
    k = mx.random.normal((1, 1, 1024 + rows, 256)).astype(dtype)
    v = mx.random.normal((1, 1, 1024 + rows, 256)).astype(dtype)
    one = mx.fast.scaled_dot_product_attention(
        q[:, :, :1], k[:, :, : 1024 + 1], v[:, :, : 1024 + 1], scale=1.0
    )
    many = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")
    return {
        "linear": _max_diff(linear(x[:, :1]), linear(x)[:, :1]),
        "sdpa": _max_diff(one, many[:, :, :1]),
        "rms_norm": _max_diff(mx.fast.rms_norm(x[:, :1], None, 1e-6), mx.fast.rms_norm(x, None, 1e-6)[:, :1]),
    }


def model_differences(
    shape: str, dtype, bits, context: int = 1024, lengths=(2, 4, 8), batch: int = 4
) -> dict:
    """Logits of each verify row (device positions, as behind a drafting round) against one-row
    decoding of the same tokens; of row 0 of a `batch`-row plain step against its step alone;
    argmax agreement."""
    target, _ = build(shape, dtype=dtype, bits=bits, calm_target=False)
    vocab = target.args.vocab_size
    prompts = random_prompts(batch, context, vocab, seed=1)
    out = {}
    for L in lengths:
        tokens = mx.array(random_prompts(1, L, vocab, seed=L))
        cache = filled_rows(target, prompts[:1]).cache
        place(cache, context, exact=False)
        verify = target.logits(target(tokens, cache))
        place(cache, context, exact=True)
        single = mx.concatenate(
            [target.logits(target(tokens[:, i : i + 1], cache)) for i in range(L)], axis=1
        )
        out[L] = _agreement(verify, single)
    tokens = mx.array(random_prompts(batch, 1, vocab, seed=batch))
    rows = target.logits(target(tokens, filled_rows(target, prompts).cache))[:1]
    alone = target.logits(target(tokens[:1], filled_rows(target, prompts[:1]).cache))
    out[f"batch {batch}"] = _agreement(rows, alone)
    return out


def _agreement(a: mx.array, b: mx.array) -> dict:
    same = (mx.argmax(a, -1) == mx.argmax(b, -1)).sum().item()
    return {"max_logit_diff": _max_diff(a, b), "argmax_agree": f"{same}/{a.shape[0] * a.shape[1]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "f32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=4, help="rows of the batched plain step")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = {"device": str(mx.default_device()), "shape": args.shape, "max_draft": MAX_DRAFT}
    for name in args.dtypes:
        dtype, bits = DTYPES[name]
        model = model_differences(args.shape, dtype, bits, context=args.context, batch=args.batch)
        report[name] = {"ops": op_differences(dtype), "model": model}
        print(name, json.dumps(report[name]), flush=True)
        mx.clear_cache()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
