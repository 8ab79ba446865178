"""What decoding costs on this device: measured once, kept on disk, read by `draft_length.Auto`.

At first use of a (target, drafter) pair on a device the speculative loop itself runs, on a
scratch cache of CONTEXT positions, a few rounds of every fixed k = 0..MAX_DRAFT (k = 0: plain
steps), and its own clock says what each took; a drafter step is timed apart — about 250
rounds (11-13 s for 26B-A4B on an H100 once its kernels were compiled, when it timed half as
many). The result is kept as JSON under `~/.cache/mlx-gemma-mtp/`, keyed by the shapes and
dtypes of every weight of both models (so quantization counts), the device, the MLX version and
how the costs were measured (method and rounds timed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .draft_length import MAX_DRAFT, Costs, Fixed
from .drafter import Drafter
from .engine import Engine, Request
from .sample import GREEDY
from .speculative import Rows, drafter_proposer, prefill
from .target import Target

COST_DIR = Path("~/.cache/mlx-gemma-mtp").expanduser()
CONTEXT = 64  # positions the scratch cache holds while timing
# Passes over every k, after a warm-up one. With 2 (a median of 6 rounds) E4B on an H100 read
# verify[2] 34.6 ms against 24.9 from 6 passes (bench r31), and k = 4 cheaper than k = 2..3:
# auto then drafted 3-4 useless opening rounds of k = 4 at alpha = 0.
REPEATS = 4
ROUNDS = 3  # rounds the loop times per k per pass: a cost is the median of REPEATS * ROUNDS
SHORT_STREAM, STREAM = 1, 5  # proposals queued back to back per timing: the difference is timed
DRAFT_SPAN = 3  # a drafter step's cost: (a k = 4 proposal - a k = 1 one) / 3
# How costs are measured, in the key: 5 = the loop's own clock on rounds of each fixed k
# (4: streams of verifies of distinct tokens, 3: of one token repeated, 1: forwards alone).
METHOD = 5


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
    costs = measure_costs(target, drafter)
    _write(path, dataclasses.asdict(costs) | {"device": _device(), "mlx": mx.__version__})
    return costs


def cost_key(target: Target, drafter: Drafter) -> str:
    """A digest of both models' weight shapes and dtypes, the device, the MLX version and the
    measuring method and its rounds."""
    shapes = [
        [(name, list(v.shape), str(v.dtype)) for name, v in tree_flatten(model.parameters())]
        for model in (target, drafter)
    ]
    blob = json.dumps([shapes, _device(), mx.__version__, METHOD, REPEATS, ROUNDS], sort_keys=True)
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


def measure_costs(target: Target, drafter: Drafter, repeats: int = REPEATS, batch: int = 1) -> Costs:
    """Time plain steps and rounds of every k by the loop's own clock, the one `Auto` learns
    from: the engine runs each fixed k on `batch` scratch rows and reports its rounds' times.
    Every k is timed once per repeat, round-robin, so a drift of the device lands on all
    alike. A drafter step is timed on its own (a stream of proposals): `Auto` needs it apart
    from the verify. `repeats`: passes over every k (the benchmark takes more for its ideal
    than a first generation can wait for)."""
    prompts = [_scratch_prompt(target, row) for row in range(batch)]
    draft = _drafter_step(target, drafter, prompts)
    lengths = range(MAX_DRAFT + 1)
    for k in lengths:  # warm-up: kernels, compiled graphs, buffers
        _loop_times(target, drafter, prompts, k, 1)
    times: dict[int, list[float]] = {k: [] for k in lengths}
    for _ in range(repeats):
        for k in lengths:
            times[k] += _loop_times(target, drafter, prompts, k, ROUNDS)
    per_round = [statistics.median(times[k]) for k in lengths]
    plain = per_round[0]
    # What a round takes less its drafter steps; at least a plain step's forward (less is
    # noise: a verify of k + 1 tokens per row does a plain step's work and more).
    verify = tuple(max(seconds - k * draft, plain) for k, seconds in enumerate(per_round))
    return Costs(plain=plain, verify=verify, draft=draft)


def _scratch_prompt(target: Target, row: int) -> list[int]:
    """CONTEXT distinct ids per row (a MoE routes distinct tokens apart), fewer in a small context."""
    n = min(CONTEXT, target.args.max_position_embeddings // 4)
    return [(7 * row + 13 * i + 5) % target.args.vocab_size for i in range(n)]


@dataclass
class _Clocked(Fixed):
    """k drafts every round, keeping what the loop's clock said rounds of k took."""

    seconds: list[float] = field(default_factory=list)

    def observe_time(self, k: int, batch: int, seconds: float) -> None:
        if k == self.k:  # (near max_tokens a round drafts fewer)
            self.seconds.append(seconds)


def _loop_times(target: Target, drafter: Drafter, prompts: list[list[int]], k: int, rounds: int) -> list[float]:
    """The engine's timings of its first `rounds` timed rounds of k drafts (k = 0: plain
    steps) for a batch of `prompts` on fresh caches."""
    policy = _Clocked(k)
    limit = target.args.max_position_embeddings - len(prompts[0])
    for _ in range(rounds + 2):  # a small context ends generations early: start them again
        engine = Engine(target, drafter, num_draft_tokens=policy, max_batch=len(prompts))
        for prompt in prompts:
            engine.add(Request(prompt=prompt, max_tokens=limit, stop_ids=frozenset()))
        while engine.busy and len(policy.seconds) < rounds:
            engine.step()
        engine.close()
        if len(policy.seconds) >= rounds:
            break
    if not policy.seconds:
        raise RuntimeError(f"the model's context ({limit} positions) is too short to time rounds of {k}")
    return policy.seconds[:rounds]


def _drafter_step(target: Target, drafter: Drafter, prompts: list[list[int]]) -> float:
    """Seconds per drafter step: (a k = DRAFT_SPAN + 1 proposal - a k = 1 one) / DRAFT_SPAN,
    each in a stream of proposals, for a batch of `prompts`."""
    parts = []
    for i, prompt in enumerate(prompts):
        cache = target.make_cache()
        hidden = prefill(target, prompt, cache)
        token = mx.array([[(prompt[-1] + 1) % target.args.vocab_size]], dtype=mx.int32)
        parts.append(Rows([i], cache, token, hidden, [GREEDY], mx.zeros((1, 2), mx.uint32), [None]))
    rows = Rows.join(parts)
    mx.eval(rows.hidden, rows.cache.state)
    propose = drafter_proposer(drafter, target)

    def draft(k: int) -> list[mx.array]:
        return [propose(rows, k).tokens]

    for k in (1, DRAFT_SPAN + 1):  # warm-up
        mx.eval(draft(k))
    one, many = (
        statistics.median(_stream_time(draft, k) for _ in range(REPEATS + 1)) for k in (1, DRAFT_SPAN + 1)
    )
    return (many - one) / DRAFT_SPAN if many > one else one  # else the per-round part is all of it


def _stream_time(fn, arg) -> float:
    """Seconds per call of `fn(arg)` (which returns arrays to evaluate) in a stream of them:
    the time of STREAM calls queued back to back less that of SHORT_STREAM, per extra call, so
    what a stream pays once (the first graph built with the device idle, the final wait) is
    left out as the loop, always a stream, leaves it out."""
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
