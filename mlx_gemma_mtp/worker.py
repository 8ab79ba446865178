"""The server's one MLX thread: it loads the model, owns the engine and steps it.

MLX streams belong to the thread that made them, and the engine is not thread-safe, so
everything that touches either happens here. Other threads talk to the worker only through
`submit`, `cancel`, `drain` and `stop`, which queue a command; the worker hands each request's
results to the `deliver` callback of its `Job` (called on the worker thread: the callback
must only hand the item on, e.g. with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .threads import clear_streams_at_thread_exit

log = logging.getLogger(__name__)

# After a step in which rows left, the worker may wait for new requests before queueing the
# next round (`Worker._step`): for this share of the engine's slack (the device stays busy
# meanwhile; half: a margin for the host's own work, which varies from step to step), or, where
# requests have been following ended rows quickly enough, of what joining a step sooner gains.
WAIT_SHARE = 0.5
LATENCIES = 32  # the latest gaps between a row's end and the next request, kept to judge a wait


class RequestError(ValueError):
    """The engine refused the request (a bad prompt, max_tokens, ...): the client's mistake."""


class ServiceError(RuntimeError):
    """The request could not be finished: the server is shutting down, or the engine failed."""


@dataclass(eq=False)
class Job:
    """One request on its way through the worker.

    `deliver` receives, in order: the row id once the engine accepted the request (or a
    RequestError), then the row's Events until one with a finish_reason (or a ServiceError).
    """

    request: Any  # engine.Request
    deliver: Callable[[object], None]
    rid: int | None = field(default=None, init=False)
    submitted: float = field(default=0.0, init=False)  # perf_counter() when it reached the worker's queue


@dataclass
class Stats:
    """What the worker's engine did since start-up, totals (`/health` shows them): the rounds'
    rows (their mean: how full the batch ran), where the steps' time went (their read-backs'
    wait for the device; the rest is the host's, this thread's and whatever it shared the
    interpreter with), and how soon a request followed a row that ended (a client's next
    request, over HTTP)."""

    steps: int = 0  # engine steps (while it held requests)
    rows: int = 0  # the rows of the batch after each step (decoding, their round queued), summed
    step_seconds: float = 0.0  # in the steps, their events delivered
    device_wait_seconds: float = 0.0  # of step_seconds, the read-backs' wait for the device
    join_wait_seconds: float = 0.0  # waiting for new requests between steps (`WAIT_SHARE`)
    refills: int = 0  # requests that came after a row had ended (one each)
    refill_seconds: float = 0.0  # ... from that row's end to the request's arrival in the queue, summed
    drafting_rows: int = 0  # rows of the drafting rounds read back, summed (a row's share: a row-round)
    drafted: int = 0  # drafts of those row-rounds (k each), summed: their mean k
    drafted_squares: int = 0  # k * k of those row-rounds, summed: how widely k spread

    def __post_init__(self):
        self._ended: deque[float] = deque()  # when rows ended that no request has followed yet

    def count_step(self, engine, seconds: float) -> None:
        """`engine` just stepped, in `seconds`."""
        self.steps += 1
        self.rows += engine.batch_size
        self.step_seconds += seconds
        self.device_wait_seconds += engine.device_wait
        k, rows = engine.last_round
        if k:
            self.drafting_rows += rows
            self.drafted += k * rows
            self.drafted_squares += k * k * rows

    def row_ended(self) -> None:
        self._ended.append(time.perf_counter())

    def row_added(self, arrived: float) -> float | None:
        """A request that arrived at `arrived` (perf_counter) joined the engine: it follows the
        earliest row end not yet followed; the gap (None: it followed none)."""
        if not self._ended:
            return None
        gap = max(arrived - self._ended.popleft(), 0.0)
        self.refills += 1
        self.refill_seconds += gap
        return gap

    def idle(self) -> None:
        """The engine holds nothing: a later request follows no end (its client was away)."""
        self._ended.clear()


class Worker:
    """Runs `load()` -> (model, tokenizer, drafter or None), as `load_pair` returns them, and
    `make_engine(model, drafter)` on its own thread, then serves jobs until `stop()`.

    An engine step that raises fails the rows it held (ServiceError) and the worker goes on
    with a fresh engine on the same model: one failure does not take the server down.
    """

    def __init__(self, load: Callable[[], tuple], make_engine: Callable[[Any, Any], Any]):
        self._load, self._make_engine = load, make_engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # rid -> job, the rows the engine holds
        self._draining = False  # refuse new jobs
        self._deadline: float | None = None  # when the rows still running are failed
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self.drafter_source: str | None = None  # the drafter's directory, once loaded
        self.stats = Stats()  # written by the worker thread only
        self._gaps: deque[float] = deque(maxlen=LATENCIES)  # row end -> next request, seconds

    def start(self):
        """Start the thread and wait until the model is loaded and the engine built; returns the
        tokenizer. Loading errors raise here."""
        self._thread.start()
        return self._ready.result()

    @property
    def rows(self) -> int:
        """Requests the engine holds (decoding or waiting for a row)."""
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        job.submitted = time.perf_counter()
        self._commands.put(("add", job))

    def cancel(self, job: Job, keep: int | None = None) -> None:
        """Stop the job's row (a no-op once it finished); its last Event says "cancelled".
        keep: how many of its tokens the client took (the prefix cache then keeps those)."""
        self._commands.put(("cancel", (job, keep)))

    def drain(self, grace: float) -> None:
        """Rows still running `grace` seconds from now end with a ServiceError."""
        self._commands.put(("deadline", time.monotonic() + grace))

    def stop(self, timeout: float | None = None) -> None:
        """End the thread; rows still running end with a ServiceError."""
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------
    # On the worker thread

    def _run(self) -> None:
        clear_streams_at_thread_exit()  # this thread evaluates: MLX's state for it goes with it
        try:
            model, tokenizer, drafter = self._load()
            self._model, self._drafter = model, drafter
            self.drafter_source = None if drafter is None else str(drafter.source)
            self._engine = self._make_engine(model, drafter)
        except Exception as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(tokenizer)
        wait = None
        while self._take_commands(wait):
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._deadline = None
                self._fail_all(ServiceError("the server is shutting down"))
            wait = self._step() if self._engine.busy else None
        self._fail_all(ServiceError("the server is shutting down"))

    def _take_commands(self, wait: tuple[int, float] | None = None) -> bool:
        """Apply the queued commands, waiting for one while the engine is idle, and for
        `wait` = (requests, until) new requests until then (`_step` says when); False on stop."""
        idle = not self._engine.busy
        wanted, until = wait or (0, 0.0)
        while True:
            if idle:
                block = True
                timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            else:
                timeout = until - time.monotonic()
                block = wanted > 0 and timeout > 0
            began = time.perf_counter()
            try:
                name, arg = self._commands.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            finally:
                if block and not idle:
                    self.stats.join_wait_seconds += time.perf_counter() - began
            if not self._apply(name, arg):
                return False
            idle = False  # then only what is queued already, or the requests waited for
            wanted -= name == "add"

    def _apply(self, name: str, arg) -> bool:
        if name == "stop":
            return False
        if name == "deadline":
            self._draining, self._deadline = True, arg
        elif name == "cancel":
            job, keep = arg
            if job.rid in self._jobs:
                self._engine.cancel(job.rid, keep)
        elif self._draining:  # "add"
            arg.deliver(ServiceError("the server is shutting down"))
        else:
            self._add(arg)
        return True

    def _add(self, job: Job) -> None:
        try:
            job.rid = self._engine.add(job.request)
        except ValueError as e:
            job.deliver(RequestError(str(e)))
            return
        self._jobs[job.rid] = job
        gap = self.stats.row_added(job.submitted)
        if gap is not None:
            self._gaps.append(gap)
        job.deliver(job.rid)

    def _step(self) -> tuple[int, float] | None:
        """One engine step, its events delivered. When rows left, how many new requests to wait
        for, and until when: a client whose answer just went out often sends its next request
        at once, and it joins a step sooner if that step waits for it.

        The wait is a share (`WAIT_SHARE`) of the larger of two budgets. The engine's slack: what
        the step's read-back waited for the device, while a round queued behind it runs; waiting
        that long costs the other rows nothing. And, where the host bounds the steps (no slack),
        what the wait buys: each awaited row joins a step sooner, a step of its time, while every
        row staying waits; that budget, a step x awaited / staying rows, is used only when 3 in 4
        of the latest requests came within the wait it allows, so a wait is seldom spent in vain."""
        began = time.perf_counter()
        try:
            events = self._engine.step()
        except Exception as e:  # an engine bug: fail its rows, keep serving on a fresh engine
            log.exception("engine step failed; its %d rows end with an error", len(self._jobs))
            self._engine = self._make_engine(self._model, self._drafter)
            self._fail_all(ServiceError(f"the engine failed: {type(e).__name__}: {e}"), cancel=False)
            return None
        left = 0
        for event in events:
            job = self._jobs.get(event.rid)
            if job is None:  # a row already failed (shutdown) whose cancellation came through
                continue
            if event.finish_reason is not None:
                del self._jobs[event.rid]
                left += 1
                self.stats.row_ended()
            job.deliver(event)
        step = time.perf_counter() - began
        self.stats.count_step(self._engine, step)
        if not self._engine.busy:
            self.stats.idle()
        wanted = min(left, self._engine.free_rows)
        if not wanted or self._draining:
            return None
        budget = self._engine.slack
        if self._gaps:
            gain = step * wanted / max(self._engine.batch_size, 1)
            if sorted(self._gaps)[(3 * len(self._gaps) + 3) // 4 - 1] <= WAIT_SHARE * gain:
                budget = max(budget, gain)
        if not budget:
            return None
        return wanted, time.monotonic() + WAIT_SHARE * budget

    def _fail_all(self, error: ServiceError, cancel: bool = True) -> None:
        for rid, job in list(self._jobs.items()):
            if cancel:
                self._engine.cancel(rid)
            job.deliver(error)
        self._jobs.clear()
