"""Where a verify's time goes as its length L grows: the whole forward against its parts, each
timed alone at the same shapes (ms, medians, one forward's worth of work per timing).

    python -m bench.profile --shape E2B --lengths 1 2 4 8 --out profile.json

Rows: `forward` (what a verify runs: body, head, argmax), `body` (the decoder layers and final
norm), `head` (tied LM head, soft-cap, argmax of L rows), `projections` (every linear layer of
every decoder layer applied to L rows, nothing else), `attention` (the fused attention of every
layer against the context, with the mask the cache gives at that L: none for one exact row,
"causal" for full layers and an additive array for sliding ones beyond). On MLX CUDA a verify of
2 tokens costs 1.7x one (E2B bf16); this says which part takes the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma_mtp.speculative import MAX_DRAFT, greedy

from . import measure
from .models import build


def _ms(fn, trials: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _input_width(linear: nn.Module) -> int:
    """Features a (possibly quantized) linear layer takes: its packed weight holds 32 / bits
    values per uint32."""
    packed = linear.weight.shape[1]
    return packed * 32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else packed


def _projections(target, L: int):
    """A call running every linear layer of every decoder layer on L random rows."""
    modules = [
        m
        for layer in target.model.layers
        for _, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]
    dtype = target.model.norm.weight.dtype
    inputs = {width: mx.random.normal((1, L, width)).astype(dtype) for width in {_input_width(m) for m in modules}}
    mx.eval(inputs)
    return lambda: [m(inputs[_input_width(m)]) for m in modules]


def _attention(target, cache, L: int):
    """Each layer's fused attention at L queries over the cache's keys, with the cache's mask."""
    calls = []
    dtype = target.model.norm.weight.dtype
    context = cache[0].offset
    for layer in target.model.layers:
        attn = layer.self_attn
        mask = cache[target.kv_producers[layer.layer_type]].mask(L, dtype)
        if isinstance(mask, mx.array):
            keys = mask.shape[-1]
        elif attn.is_sliding:
            keys = target.args.sliding_window  # one exact row: the fetch is cut to the window
        else:
            keys = context + L
        q = mx.random.normal((1, attn.n_heads, L, attn.head_dim)).astype(dtype)
        kv = mx.random.normal((2, 1, attn.n_kv_heads, keys, attn.head_dim)).astype(dtype)
        calls.append((q, kv[0], kv[1], mask, attn.scale))
    mx.eval([c[:3] for c in calls])
    return lambda: [mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask=m) for q, k, v, m, s in calls]


def profile(target, context: int, lengths, trials: int) -> dict:
    cache = measure.filled_cache(target, context)
    hidden_size = target.args.hidden_size
    dtype = target.model.norm.weight.dtype
    rows: dict[str, dict[int, float]] = {name: {} for name in ("forward", "body", "head", "projections", "attention")}
    for L in lengths:
        tokens = measure.random_tokens(L, target.args.vocab_size, seed=L)
        hidden = mx.random.normal((1, L, hidden_size)).astype(dtype)

        def forward(run_head: bool):
            def run():
                out = target(tokens, cache)
                out = greedy(target, out) if run_head else out
                mx.eval(out)
                for c in cache:
                    c.trim(L)
                return out

            return run

        rows["forward"][L] = _ms(forward(True), trials)
        rows["body"][L] = _ms(forward(False), trials)
        rows["head"][L] = _ms(lambda: greedy(target, hidden), trials)
        rows["projections"][L] = _ms(_projections(target, L), trials)
        rows["attention"][L] = _ms(_attention(target, cache, L), trials)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if max(args.lengths) > MAX_DRAFT + 1:
        p.error(f"lengths go up to {MAX_DRAFT + 1} (a verify of MAX_DRAFT drafts)")
    target, _ = build(args.shape, bits=args.bits)
    rows = profile(target, args.context, args.lengths, args.trials)
    print(f"{args.shape} {args.bits or 'bf16'} ms at L = {' '.join(map(str, args.lengths))}")
    for name, by_length in rows.items():
        print(f"  {name:12s}" + "".join(f"{by_length[L]:9.2f}" for L in args.lengths))
    if args.out:
        report = {"shape": args.shape, "bits": args.bits, "context": args.context, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(report | {"device": str(mx.default_device()), "mlx": mx.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
