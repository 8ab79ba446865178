"""MLX work on threads other than the main one: the process still exits cleanly (exit 0, not
134). Each pattern runs once here, in its own interpreter (tests/thread_exit.py); the 50-run
check is `python -m tests.thread_exit TARGET DRAFTER --runs 50`."""

from __future__ import annotations

import threading

import pytest

from mlx_gemma_mtp.threads import clear_streams_at_thread_exit
from tests.thread_exit import PATTERNS, run_pattern


@pytest.mark.parametrize("pattern", PATTERNS)
def test_process_exits_cleanly_after_work_on_threads(checkpoints, pattern):
    # "worker-cache" aborts in every run where a thread's MLX state outlives its join(); the
    # README's patterns did in some runs (issue 19: 5 and 3 of 10).
    target, drafter = checkpoints["dense"]
    result = run_pattern(pattern, target, drafter)
    assert result.returncode == 0, f"{pattern}: exit {result.returncode}\n{result.stderr[-2000:]}"


def test_clear_streams_at_thread_exit_runs_on_that_thread_before_join_returns(monkeypatch):
    calls = []
    monkeypatch.setattr("mlx.core.clear_streams", lambda: calls.append(threading.get_ident()))

    def work():
        clear_streams_at_thread_exit()
        clear_streams_at_thread_exit()  # once per thread, however often asked
        calls.append(("worker", threading.get_ident()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    worker = calls[0][1]
    assert calls == [("worker", worker), worker]  # cleared once, on the worker, before join returned
    clear_streams_at_thread_exit()  # the main thread: left to MLX's own exit cleanup
    assert calls == [("worker", worker), worker]
