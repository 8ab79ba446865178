"""What our commands choose for MLX's CUDA backend in their own process (a library import
changes nothing: an app embedding the package keeps its environment).

MLX CUDA captures each new shape of work into a CUDA graph and replays it. A batch whose rows
come and go, or whose draft length changes, keeps meeting new shapes: on an H100 a row leaving
cost +38 and +15 ms over the next two steps with graphs and +19 ms over one without, a
one-round switch of the draft length +22 ms with graphs and nothing without, while steady
decoding ran about as fast either way (r49, `bench.churn`, E2B bf16 at B = 8; bench/RESULTS.md).
So the commands and the benchmarks run without CUDA graphs unless `MLX_USE_CUDA_GRAPHS` is set.
Metal has no CUDA graphs: on a Mac the setting does nothing.
"""

from __future__ import annotations

import os

GRAPHS = "MLX_USE_CUDA_GRAPHS"


def without_graphs_unless_set() -> None:
    """Turn CUDA graphs off for this process unless the environment chose. MLX reads the
    setting once, at its first CUDA kernel: call before anything computes."""
    os.environ.setdefault(GRAPHS, "0")
