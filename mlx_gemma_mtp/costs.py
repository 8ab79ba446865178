"""What decoding costs on this device, per batch size: measured once, kept on disk, read by
`draft_length.Auto`.

For a (target, drafter) pair on a device, the engine itself runs, on B scratch rows of CONTEXT
positions (prefilled once, each timing starting from there), a few rounds of every fixed k =
0..MAX_DRAFT (k = 0: plain steps), and its own clock says what each took; a drafter step is
timed apart. That is about 250 rounds per batch size: seconds for a small model, minutes for the
largest at large batches (more when a process first compiles its kernels). `mlx-gemma-mtp
calibrate` does it up front; otherwise the first "auto" generation does it, saying so on stderr.
The result is kept as JSON under `~/.cache/mlx-gemma-mtp/`, one file per pair and device, one
entry per batch size measured, keyed by the shapes and dtypes of every weight of both models (so
quantization counts), the device, the MLX version and the method.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .draft_length import MAX_DRAFT, Costs, Fixed
from .drafter import Drafter
from .engine import Engine, PromptCache, Request
from .sample import GREEDY
from .speculative import Rows, drafter_proposer, prefill
from .target import Target

COST_DIR = Path("~/.cache/mlx-gemma-mtp").expanduser()
CONTEXT = 64  # positions each scratch row holds while timing
# Passes over every k, after a warm-up one: a cost is the median of REPEATS * ROUNDS rounds (with
# fewer, one k's few timings swing and auto trusts a lucky one; docs/history.md, r31).
REPEATS = 4
ROUNDS = 3  # rounds the loop times per k per pass
SHORT_STREAM, STREAM = 1, 5  # proposals queued back to back per timing: the difference is timed
DRAFT_SPAN = 3  # a drafter step's cost: (a k = 4 proposal - a k = 1 one) / 3
# How costs are measured, in the key: 6 = the batched engine's own clock on rounds of each
# fixed k, per batch size (5: the single-sequence loop's clock; 4 and below: forwards timed apart).
METHOD = 6
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # what a batch of up to max_batch rows gets measured at

Progress = Callable[[int, int], None]  # (done, of): called as the measurement goes


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes costs are measured at for batches of up to `max_batch` rows: powers of
    two below it, and it."""
    return tuple(sorted({b for b in BATCH_SIZES if b < max_batch} | {max_batch}))


def load_costs(
    target: Target,
    drafter: Drafter,
    batches: Sequence[int] = (1,),
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Costs:
    """This device's costs for the pair at `batches`: read from `cache_dir` (default COST_DIR),
    and what is missing measured and written there, each batch size as soon as it is measured
    (a measurement cut short, by Ctrl-C or a time limit, keeps the sizes it finished).
    Measuring says so on stderr, with a progress bar, unless `progress` reports it."""
    path = cost_path(target, drafter, cache_dir)
    saved = _read(path)
    missing = [b for b in batches if b not in saved]
    if missing:
        report = progress or _notice(path, missing)
        for i, b in enumerate(missing):
            saved[b] = measure_costs(target, drafter, batch=b, progress=_part(report, i, len(missing)))
            entries = {str(size): saved[size] for size in sorted(saved)}
            _write(path, {"device": _device(), "mlx": mx.__version__, "batches": entries})
    rows = sorted(set(batches))
    return Costs(
        batches=tuple(rows),
        verify=tuple(tuple(saved[b]["verify"]) for b in rows),
        draft=tuple(saved[b]["draft"] for b in rows),
    )


def cost_path(target: Target, drafter: Drafter, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or COST_DIR) / f"costs-{cost_key(target, drafter)}.json"


def _read(path: Path) -> dict[int, dict]:
    """{batch: {"verify": [...], "draft": s, "seconds": s where known}} of a costs file; empty
    when there is none or it cannot be read (a write cut short, an older format): those are
    measured again."""
    try:
        entries = json.loads(path.read_text())["batches"]
        return {
            int(b): {"verify": list(e["verify"]), "draft": float(e["draft"])}
            | ({"seconds": float(e["seconds"])} if "seconds" in e else {})
            for b, e in entries.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _notice(path: Path, batches: list[int]) -> Progress:
    """A measurement nobody asked for says what it does, then draws a progress bar on stderr."""
    sizes = ", ".join(map(str, batches))
    print(
        f"Measuring this device's drafting costs once (batch sizes {sizes}); kept in {path}. "
        "`mlx-gemma-mtp calibrate MODEL` does this up front.",
        file=sys.stderr,
        flush=True,
    )
    return progress_bar()


def progress_bar(width: int = 30) -> Progress:
    """A progress bar on stderr: redrawn in place on a terminal, else a line per tenth."""
    terminal = sys.stderr.isatty()

    def bar(done: int, of: int) -> None:
        if not terminal and done != of and 10 * done // of == 10 * (done - 1) // of:
            return
        filled = width * done // of
        line = f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{of}"
        if terminal:
            print("\r" + line, end="\n" if done == of else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return bar


def _part(report: Progress, index: int, parts: int) -> Progress:
    """Progress of part `index` of `parts` equal parts, reported as the whole's."""
    return lambda done, of: report(index * of + done, parts * of)


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


def measure_costs(
    target: Target,
    drafter: Drafter,
    repeats: int | None = None,
    batch: int = 1,
    progress: Progress | None = None,
) -> dict:
    """{"verify": seconds of a forward of `batch` rows x (k + 1) tokens for k = 0..MAX_DRAFT ([0]:
    a plain step), "draft": seconds of a drafter step of `batch` rows, "seconds": what
    measuring took}, by the engine's own clock, the one `Auto` learns from: it runs each
    fixed k on `batch` scratch rows and reports its rounds' times. Every k is timed once per
    repeat, round-robin, so a drift of the device lands on all alike. A drafter step is
    timed on its own (a stream of proposals): `Auto` needs it apart from the verify.
    `repeats`: passes over every k (default REPEATS)."""
    repeats = REPEATS if repeats is None else repeats
    began = time.perf_counter()
    scratch = _scratch(target, batch)
    lengths = range(MAX_DRAFT + 1)
    steps, done = (repeats + 1) * len(lengths) + 1, 0
    report = progress or (lambda done, of: None)
    draft = _drafter_step(target, drafter, scratch)
    times: dict[int, list[float]] = {k: [] for k in lengths}
    for repeat in range(repeats + 1):  # the first pass warms up: kernels, compiled graphs, buffers
        for k in lengths:
            report(done := done + 1, steps)
            seconds = _loop_times(target, drafter, scratch, k, ROUNDS if repeat else 1)
            if repeat:
                times[k] += seconds
    report(steps, steps)
    per_round = [statistics.median(times[k]) for k in lengths]
    plain = per_round[0]
    # What a round takes less its drafter steps; at least a plain step's forward (less is
    # noise: a verify of k + 1 tokens per row does a plain step's work and more).
    return {
        "verify": [max(seconds - k * draft, plain) for k, seconds in enumerate(per_round)],
        "draft": draft,
        "seconds": time.perf_counter() - began,
    }


def _scratch_prompt(target: Target, row: int) -> list[int]:
    """CONTEXT distinct ids per row (a MoE routes distinct tokens apart), fewer in a small context."""
    n = min(CONTEXT, target.args.max_position_embeddings // 4)
    return [(7 * row + 13 * i + 5) % target.args.vocab_size for i in range(n)]


Scratch = list[tuple[list[int], PromptCache]]  # per row: its prompt, a cache of all but its last id


def _scratch(target: Target, batch: int) -> Scratch:
    """`batch` scratch rows, each prefilled once: every timing starts its rows from there, so
    that it prefills one id a row rather than the prompt (on a device slow at prefill, most of
    the measurement's time otherwise). A timing hands each row's cache to the engine, which
    gives it back when the row leaves and rewinds it to the prompt when the next one starts:
    no copies (31B's sliding rings are a GB a row: three sets of them at B = 16 ran an H100
    out of memory)."""
    rows = []
    for row in range(batch):
        prompt = _scratch_prompt(target, row)
        cache = target.make_cache()
        prefill(target, prompt[:-1], cache)
        mx.eval(cache.state)
        rows.append((prompt, PromptCache(cache, prompt[:-1])))
    return rows


@dataclass
class _Clocked(Fixed):
    """k drafts every round, keeping what the loop's clock said rounds of k took."""

    seconds: list[float] = field(default_factory=list)

    def observe_time(self, k: int, batch: int, seconds: float, own: float | None = None) -> None:
        if k == self.k:  # (near max_tokens a round drafts fewer)
            self.seconds.append(seconds)


def _loop_times(target: Target, drafter: Drafter, scratch: Scratch, k: int, rounds: int) -> list[float]:
    """The engine's timings of its first `rounds` timed rounds of k drafts (k = 0: plain
    steps) for a batch of the `scratch` rows, each from its prefilled cache (the engine takes
    it, rewound to the prompt, and leaves the row's there when it ends)."""
    policy = _Clocked(k)
    limit = target.args.max_position_embeddings - len(scratch[0][0])
    for _ in range(rounds + 2):  # a small context ends generations early: start them again
        engine = Engine(target, drafter, num_draft_tokens=policy, max_batch=len(scratch))
        for prompt, kept in scratch:
            engine.add(Request(prompt=prompt, max_tokens=limit, stop_ids=frozenset(), cache=kept))
        while engine.busy and len(policy.seconds) < rounds:
            engine.step()
        engine.close()
        if len(policy.seconds) >= rounds:
            break
    if not policy.seconds:
        raise RuntimeError(f"the model's context ({limit} positions) is too short to time rounds of {k}")
    return policy.seconds[:rounds]


def _drafter_step(target: Target, drafter: Drafter, scratch: Scratch) -> float:
    """Seconds per drafter step: (a k = DRAFT_SPAN + 1 proposal - a k = 1 one) / DRAFT_SPAN,
    each in a stream of proposals, for a batch of the `scratch` rows (their caches move on by
    the last prompt id, which a timing's start rewinds)."""
    parts = []
    for i, (prompt, kept) in enumerate(scratch):
        cache = kept.cache
        hidden = prefill(target, prompt[-1:], cache)
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
