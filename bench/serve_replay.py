"""`python -m bench.serve_replay --replay FILE.npz SERVE_ARGS...`: `mlx-gemma-mtp serve` whose
engine drafts replayed continuations (`bench.replay`) at the acceptance `bench.serve --alphas`
chose, so that a server is measured at a controlled acceptance as the in-process engine is.

FILE holds `table` (`replay_table`: [prompts, width, MAX_DRAFT]) and `prompt_lens`; a request's
seed names its prompt (`replay.by_seed`). The drafter still runs every round.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.cli import serve_main
from mlx_gemma_mtp.speculative import drafter_proposer

from .replay import by_seed, replay_proposer


def replayed(path: str):
    """propose(model, drafter) for `serve_main`: the drafter's proposer, its tokens replaced."""
    with np.load(path) as saved:
        table, prompt_lens = mx.array(saved["table"], dtype=mx.int32), saved["prompt_lens"].tolist()

    def propose(model, drafter):
        if drafter is None:
            raise SystemExit("bench.serve_replay: the model has no drafter to replay through")
        return replay_proposer(drafter_proposer(drafter, model), table, prompt_lens, key=by_seed)

    return propose


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--replay", required=True, help="the .npz bench.serve wrote")
    args, serve_args = p.parse_known_args(argv)
    return serve_main(serve_args, propose=replayed(args.replay))


if __name__ == "__main__":
    sys.exit(main())
