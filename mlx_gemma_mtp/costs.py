"""What decoding costs on this device: measured once, kept on disk, read by `draft_length.Auto`.

At first use of a (target, drafter) pair on a device we time, on a scratch cache of CONTEXT
positions: one target forward (with its logits and argmax) of L = 1..MAX_DRAFT+1 new tokens,
the drafter's steps, and pipelined plain decoding — about a second for E2B. The result is kept
as JSON under `~/.cache/mlx-gemma-mtp/`, keyed by the shapes and dtypes of every weight of both
models (so quantization counts), the device and the MLX version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .draft_length import MAX_DRAFT, Costs
from .drafter import Drafter
from .speculative import DraftRequest, Proposer, drafter_proposer, greedy, plain_tokens, prefill, rewind
from .target import Target

COST_DIR = Path("~/.cache/mlx-gemma-mtp").expanduser()
CONTEXT = 64  # positions the scratch cache holds while timing
REPEATS = 3  # timings per measurement (median), after one warm-up
PLAIN_STEPS = 8  # tokens of plain decoding timed


def load_costs(target: Target, drafter: Drafter, cache_dir: Path | None = None) -> Costs:
    """This device's costs for the pair: read from `cache_dir` (default COST_DIR), or measured
    and written there."""
    path = Path(cache_dir or COST_DIR) / f"costs-{cost_key(target, drafter)}.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            return Costs(plain=saved["plain"], verify=tuple(saved["verify"]), draft=saved["draft"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable (a write cut short, an older format): measure again
    costs = measure_costs(target, drafter_proposer(drafter, target))
    _write(path, dataclasses.asdict(costs) | {"device": _device(), "mlx": mx.__version__})
    return costs


def cost_key(target: Target, drafter: Drafter) -> str:
    """A digest of both models' weight shapes and dtypes, the device and the MLX version."""
    shapes = [
        [(name, list(v.shape), str(v.dtype)) for name, v in tree_flatten(model.parameters())]
        for model in (target, drafter)
    ]
    blob = json.dumps([shapes, _device(), mx.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What names the device in the cost key: MLX CUDA's device_info also reports free memory,
# which changes from one generation to the next and would have every one measure again.
DEVICE_KEYS = ("device_name", "architecture", "memory_size", "total_memory")


def _device() -> str:
    info = {k: v for k, v in mx.device_info().items() if k in DEVICE_KEYS}
    return f"{mx.default_device()} {json.dumps(info, sort_keys=True)}"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=1) + "\n")
    scratch.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one


def measure_costs(target: Target, propose: Proposer) -> Costs:
    """Time the target's forwards, the proposer's steps and plain decoding on a scratch cache."""
    cache = target.make_cache(room=MAX_DRAFT + 1)
    prompt = mx.arange(CONTEXT, dtype=mx.int32)[None] % target.args.vocab_size
    hidden = prefill(target, prompt, cache)
    mx.eval(hidden, [c.state for c in cache])
    token = mx.array([[CONTEXT % target.args.vocab_size]], dtype=mx.int32)
    tokens = mx.broadcast_to(token, (1, MAX_DRAFT + 1))

    def verify(L: int) -> None:
        mx.eval(greedy(target, target(tokens[:, :L], cache)))
        rewind(cache, L)

    def draft(k: int) -> None:
        request = DraftRequest(token=token, hidden=hidden, position=CONTEXT, generated=0, k=k)
        mx.eval(propose(request, cache).tokens)

    verify_times = tuple(_median_time(verify, L) for L in range(1, MAX_DRAFT + 2))
    one, four = _median_time(draft, 1), _median_time(draft, 4)
    step = (four - one) / 3 if four > one else one  # the per-round part is in verify's time
    return Costs(plain=_plain_time(target, cache, token), verify=verify_times, draft=step)


def _median_time(fn, arg) -> float:
    fn(arg)  # warm-up: kernels, compiled graphs, buffers
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plain_time(target: Target, cache: list, token: mx.array) -> float:
    """Seconds per token of the plain decoding loop itself (pipelined), after its first token."""
    offset = cache[0].offset
    times = []
    for _ in range(REPEATS):
        tokens = plain_tokens(target, token, cache)
        next(tokens)  # the first token: a one-token prefill, not timed
        start = time.perf_counter()
        for _ in range(PLAIN_STEPS):
            next(tokens)
        times.append((time.perf_counter() - start) / PLAIN_STEPS)
        tokens.close()
        rewind(cache, cache[0].offset - offset)
    return statistics.median(times)
