"""Threads that evaluate MLX work must free MLX's per-thread state before they end.

MLX 0.32 keeps a compile cache per thread (a C++ `thread_local`) whose entries hold Python
objects; `mx.compile`d functions fill it (mlx-lm's samplers and activations, our drafter step).
If nobody clears it, it is destroyed when the OS thread exits, which is *after* Python's
`Thread.join()` has returned. Should the main thread be finalizing the interpreter by then, the
destructor's `PyGILState_Ensure` calls `pthread_exit` inside a `noexcept` TLS destructor:
`terminate called without an active exception`, exit 134. MLX cleans up the main thread at
interpreter exit; every other thread has to call `mx.clear_streams()` itself before it ends
(ml-explore/mlx#4373; MLX's own python/tests/test_threads.py do so). docs/threads.md has the
backtrace and a reproduction with MLX alone.

`clear_streams_at_thread_exit()` arranges that call for the current thread, once: a guard kept
in a `threading.local` is released when Python clears the thread's state, on that thread, with
the GIL held, before `join()` returns and so before the interpreter can finalize.
"""

from __future__ import annotations

import threading

import mlx.core as mx

_guards = threading.local()


class _ClearStreamsOnRelease:
    """Calls `mx.clear_streams()` when released, if released on the thread that made it (a
    `threading.local` torn down from another thread at shutdown must not clear that thread's)."""

    def __init__(self):
        self.thread_id = threading.get_ident()

    def __del__(self):
        if threading.get_ident() == self.thread_id:
            mx.clear_streams()


def clear_streams_at_thread_exit() -> None:
    """Make the current thread call `mx.clear_streams()` (its MLX streams, random state and
    compile cache) when it ends. Idempotent and cheap: call it wherever a thread starts MLX
    work. The main thread is left alone: MLX clears it at interpreter exit."""
    if threading.current_thread() is threading.main_thread():
        return
    if getattr(_guards, "guard", None) is None:
        _guards.guard = _ClearStreamsOnRelease()
