"""What decoding costs on this device: measured once, kept on disk, read by `draft_length.Auto`.

At first use of a (target, drafter) pair on a device we time, on a scratch cache of CONTEXT
positions and pipelined as the loop runs them: a target forward (with its logits and argmax)
of L = 1..MAX_DRAFT+1 new tokens (L = 1 is a plain token) and the drafter's steps — about 250
calls: a few seconds for E2B. The result is kept as JSON under `~/.cache/mlx-gemma-mtp/`, keyed
by the shapes and dtypes of every weight of both models (so quantization counts), the device,
the MLX version and how the costs were measured.
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
from .speculative import DraftRequest, Proposer, drafter_proposer, greedy, prefill, rewind
from .target import Target

COST_DIR = Path("~/.cache/mlx-gemma-mtp").expanduser()
CONTEXT = 64  # positions the scratch cache holds while timing
REPEATS = 2  # timings per measurement (their mean), after a warm-up call
SHORT_STREAM, STREAM = 1, 5  # calls queued back to back per timing: the difference is timed
DRAFT_SPAN = 3  # a drafter step's cost: (a k = 4 proposal - a k = 1 one) / 3
# How costs are measured, in the key: 4 = difference of two streams, verifies of distinct
# tokens (3: of one token repeated, 1: forwards alone).
METHOD = 4


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
    """A digest of both models' weight shapes and dtypes, the device, the MLX version and the
    measuring method."""
    shapes = [
        [(name, list(v.shape), str(v.dtype)) for name, v in tree_flatten(model.parameters())]
        for model in (target, drafter)
    ]
    blob = json.dumps([shapes, _device(), mx.__version__, METHOD], sort_keys=True)
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
    """Time the target's forwards and the proposer's steps on a scratch cache, each as the
    loop runs them: in a stream queued back to back, the host building one while the
    device runs the one before (a forward timed alone also waits for its own graph to be
    built and launched: seen on MLX CUDA, a plain token so timed cost 1.4x the loop's, a
    round little more than one, and auto drafted with a useless drafter). Every length is
    timed once per repeat, round-robin, so a drift of the device lands on all alike."""
    cache = target.make_cache(room=MAX_DRAFT + 1)
    prompt = mx.arange(CONTEXT, dtype=mx.int32)[None] % target.args.vocab_size
    hidden = prefill(target, prompt, cache)
    mx.eval(hidden, [c.state for c in cache])
    # Distinct tokens, as drafts are: a mixture-of-experts layer routes each row on its own,
    # and one token repeated would read a single set of experts for every row of a verify.
    tokens = (CONTEXT + mx.arange(MAX_DRAFT + 1, dtype=mx.int32)[None]) % target.args.vocab_size
    token = tokens[:, :1]

    def verify(L: int) -> list[mx.array]:
        out = greedy(target, target(tokens[:, :L], cache))
        rewind(cache, L)  # the next one writes the same positions: a chain, as rounds are
        return [out]

    def draft(k: int) -> list[mx.array]:
        request = DraftRequest(token=token, hidden=hidden, position=CONTEXT, generated=0, k=k)
        return [propose(request, cache).tokens]

    work = [(verify, L) for L in range(1, MAX_DRAFT + 2)] + [(draft, 1), (draft, DRAFT_SPAN + 1)]
    times: dict[tuple, list[float]] = {item: [] for item in work}
    for fn, arg in work:  # warm-up: kernels, compiled graphs, buffers
        mx.eval(fn(arg))
    for _ in range(REPEATS):
        for fn, arg in work:
            times[(fn, arg)].append(_stream_time(fn, arg))
    cost = {item: statistics.median(t) for item, t in times.items()}
    verify_times = tuple(cost[(verify, L)] for L in range(1, MAX_DRAFT + 2))
    one, many = cost[(draft, 1)], cost[(draft, DRAFT_SPAN + 1)]
    step = (many - one) / DRAFT_SPAN if many > one else one  # the per-round part is in verify's time
    # A plain token is a one-token forward, pipelined as plain decoding runs it.
    return Costs(plain=verify_times[0], verify=verify_times, draft=step)


def _stream_time(fn, arg) -> float:
    """Seconds per call of `fn(arg)` (which returns arrays to evaluate) in a stream of them:
    the time of STREAM calls queued back to back less that of SHORT_STREAM, per extra call, so
    what a stream pays once (the first graph built with the device idle, the final wait) is
    left out as the loop, always a stream, leaves it out (timed whole, 4 one-token forwards
    cost 1.35x a plain token of the loop on MLX CUDA, 8 drafting ones 1.1x: bias, not drift)."""
    times = []
    for calls in (SHORT_STREAM, STREAM):
        start = time.perf_counter()
        outs = []
        for _ in range(calls):
            outs += fn(arg)
            mx.async_eval(outs[-1])
        mx.eval(outs)
        times.append(time.perf_counter() - start)
    return max(times[1] - times[0], 0.0) / (STREAM - SHORT_STREAM)
