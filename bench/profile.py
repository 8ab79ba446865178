"""Where a verify's time goes as its length L grows: the whole forward of B rows x L tokens
against its parts, each timed alone at the same shapes (ms, medians, one forward's worth of
work per timing).

    python -m bench.profile --shape E2B --batch 4 --lengths 1 2 4 8 --out profile.json

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

from mlx_gemma_mtp.speculative import MAX_DRAFT

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


def _projections(target, B: int, L: int):
    """A call running every linear layer of every decoder layer on B x L random rows."""
    modules = [
        m
        for layer in target.model.layers
        for _, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]
    dtype = target.model.norm.weight.dtype
    inputs = {w: mx.random.normal((B, L, w)).astype(dtype) for w in {_input_width(m) for m in modules}}
    mx.eval(inputs)
    return lambda: [m(inputs[_input_width(m)]) for m in modules]


def _attention(target, cache, context: int, L: int):
    """Each layer's fused attention at L queries per row over the keys its cache layer returns,
    with the cache's mask for that forward."""
    measure.place(cache, context, exact=L == 1)
    dtype = target.model.norm.weight.dtype
    masks = cache.begin(L, dtype)
    calls = []
    for layer in target.model.layers:
        attn, mask = layer.self_attn, masks[layer.layer_type]
        if isinstance(mask, mx.array):
            keys = mask.shape[-1]
        else:  # full attention, rows at one host position: keys 0 .. context + L - 1
            keys = context + L
        q = mx.random.normal((cache.rows, attn.n_heads, L, attn.head_dim)).astype(dtype)
        kv = mx.random.normal((2, cache.rows, attn.n_kv_heads, keys, attn.head_dim)).astype(dtype)
        calls.append((q, kv[0], kv[1], mask, attn.scale))
    mx.eval([c[:3] for c in calls])
    return lambda: [mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask=m) for q, k, v, m, s in calls]


def _forward(target, cache, tokens, context: int, head: bool):
    def run():
        measure.place(cache, context, exact=tokens.shape[1] == 1)
        out = target(tokens, cache)
        return mx.argmax(target.logits(out), axis=-1) if head else out

    return run


def profile(target, context: int, batch: int, lengths, trials: int) -> dict:
    vocab = target.args.vocab_size
    cache = measure.filled_rows(target, measure.random_prompts(batch, context, vocab, seed=1)).cache
    dtype = target.model.norm.weight.dtype
    rows: dict[str, dict[int, float]] = {
        name: {} for name in ("forward", "body", "head", "projections", "attention")
    }
    for L in lengths:
        tokens = mx.array(measure.random_prompts(batch, L, vocab, seed=L))
        hidden = mx.random.normal((batch, L, target.args.hidden_size)).astype(dtype)
        rows["forward"][L] = _ms(_forward(target, cache, tokens, context, head=True), trials)
        rows["body"][L] = _ms(_forward(target, cache, tokens, context, head=False), trials)
        rows["head"][L] = _ms(lambda h=hidden: mx.argmax(target.logits(h), axis=-1), trials)
        rows["projections"][L] = _ms(_projections(target, batch, L), trials)
        rows["attention"][L] = _ms(_attention(target, cache, context, L), trials)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="E2B")
    p.add_argument("--bits", type=int)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="rows per forward")
    p.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if max(args.lengths) > MAX_DRAFT + 1:
        p.error(f"lengths go up to {MAX_DRAFT + 1} (a verify of MAX_DRAFT drafts)")
    target, _ = build(args.shape, bits=args.bits)
    rows = profile(target, args.context, args.batch, args.lengths, args.trials)
    print(f"{args.shape} {args.bits or 'bf16'} B={args.batch} ms at L = {' '.join(map(str, args.lengths))}")
    for name, by_length in rows.items():
        print(f"  {name:12s}" + "".join(f"{by_length[L]:9.2f}" for L in args.lengths))
    if args.out:
        report = {
            "shape": args.shape,
            "bits": args.bits,
            "batch": args.batch,
            "context": args.context,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report | {"device": str(mx.default_device()), "mlx": mx.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
