"""Does a process whose MLX work ran on other threads exit cleanly? Each pattern runs in its own
child process; the exit code is the verdict (134: MLX's per-thread state torn down during
interpreter finalization, see mlx_gemma_mtp/threads.py).

    python -m tests.thread_exit TARGET_DIR DRAFTER_DIR --runs 50     # exit codes per pattern

Patterns:
- "chat-cancel": the README's ChatSession example: answer on a thread, cancel() from the main one.
- "two-generate": two threads calling generate on one model, then joined.
- "worker-cache": one worker thread generates, then runs a compiled function of its own whose cache
  entry takes 0.5 s to release: where the thread's MLX state is not freed before join() returns,
  the abort happens in every run rather than now and then.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PATTERNS = ("chat-cancel", "two-generate", "worker-cache")


def _chat_cancel(target: str, drafter: str) -> None:
    from mlx_gemma_mtp import ChatSession, load_pair

    model, tokenizer, draft_model = load_pair(target, draft_model=drafter)
    session = ChatSession(
        model, tokenizer, draft_model=draft_model, system="Be brief.", max_tokens=32, num_draft_tokens=3
    )

    def answer(text):
        for _ in session.send(text):
            pass

    threading.Thread(target=answer, args=("Why is the sky blue?",)).start()
    session.cancel()


def _two_generate(target: str, drafter: str) -> None:
    from mlx_gemma_mtp import generate, load

    model, tokenizer = load(target)
    threads = [
        threading.Thread(target=generate, args=(model, tokenizer, prompt), kwargs={"max_tokens": 16})
        for prompt in ("Why is the sky blue?", "hello there")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


_kept: list = []


class _SlowRelease:
    """Takes a while to release (the GIL is free meanwhile), as a large cache entry can."""

    def __del__(self):
        time.sleep(0.5)


def _worker_cache(target: str, drafter: str) -> None:
    import mlx.core as mx

    from mlx_gemma_mtp import generate, load

    model, tokenizer = load(target)
    # A compiled function's cache entry keeps its output's Python structure: here an object whose
    # release takes 0.5 s. Released at the OS thread's exit, the main thread is finalizing by the
    # time it needs the GIL back (exit 134 in every run); released with the thread's Python
    # state, before join() returns, all is well.
    step = mx.compile(lambda x: (x + 1, _SlowRelease()))
    _kept.append(step)  # lives until the interpreter ends: released earlier, it erases its cache entry

    def work():
        generate(model, tokenizer, "hello there", max_tokens=4)
        mx.eval(step(mx.ones((4,)))[0])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


_CHILDREN = {"chat-cancel": _chat_cancel, "two-generate": _two_generate, "worker-cache": _worker_cache}


def run_pattern(pattern: str, target, drafter, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one pattern in a fresh interpreter; its returncode is the verdict."""
    return subprocess.run(
        [sys.executable, "-m", "tests.thread_exit", "--child", pattern, str(target), str(drafter)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        timeout=timeout,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target")
    parser.add_argument("drafter")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--child", choices=PATTERNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _CHILDREN[args.child](args.target, args.drafter)
        return 0
    failed = False
    for pattern in args.patterns:
        codes = collections.Counter(
            run_pattern(pattern, args.target, args.drafter).returncode for _ in range(args.runs)
        )
        print(
            f"{pattern}: " + ", ".join(f"exit {code}: {n}/{args.runs}" for code, n in sorted(codes.items()))
        )
        failed |= set(codes) != {0}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
