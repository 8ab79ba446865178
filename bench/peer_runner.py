"""The peer's side of `python -m bench.peer`: runs in a Python of its own whose `mlx_lm` is the
mlx-lm-broomva fork (PYTHONPATH=<peer dir> first; started with `python -P` so that this
folder's modules shadow nothing). It imports nothing of ours.

Protocol, one JSON object per line: on start it answers {"ready": ...} (or {"error": ...}
and exits 2); then for each request {"draft": k, "tokens": n, "prompt": [ids]} (k = 0: its
plain `generate_step`; k > 0: its `mtp_speculative_generate_step` with k drafts per round,
both through its own `stream_generate`, greedy) it answers one run's tokens and timing.
End of input ends it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

# Replies go to the real stdout; anything the fork prints goes to stderr, off the protocol.
REPLIES = sys.stdout
sys.stdout = sys.stderr


def reply(obj: dict) -> None:
    REPLIES.write(json.dumps(obj) + "\n")
    REPLIES.flush()


def start(peer_path: Path, target: Path, drafter: Path):
    """(generate module, target, tokenizer, drafter, ready message), or exit with an error line."""
    try:
        import mlx.core as mx
        import mlx_lm

        generate = importlib.import_module("mlx_lm.generate")
        utils = importlib.import_module("mlx_lm.utils")
    except Exception as e:
        fail(f"importing mlx_lm from {peer_path} failed: {type(e).__name__}: {e}")
    where = Path(mlx_lm.__file__).resolve()
    if peer_path.resolve() not in where.parents:
        fail(f"mlx_lm was imported from {where}, not from {peer_path}: the fork is not installed there")
    if not hasattr(generate, "mtp_speculative_generate_step"):
        fail(f"{where.parent}/generate.py has no mtp_speculative_generate_step: not the MTP fork")
    try:
        package = version("mlx-lm-broomva")
    except PackageNotFoundError:
        package = None
    try:
        model, tokenizer = utils.load(str(target))
        # Its CLI loads --draft-model with `load` (model and tokenizer); the model is what it drafts with.
        draft_model, _ = utils.load_model(drafter)
    except Exception as e:
        fail(f"the fork cannot load {target} with {drafter}: {type(e).__name__}: {e}")
    if not generate.is_mtp_drafter(draft_model):
        fail(f"{drafter}: the fork does not take this drafter for an MTP drafter (is_mtp_drafter)")
    ready = {
        "ready": True,
        "package": "mlx-lm-broomva",
        "version": package,
        "mlx_lm_file": str(where),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "target_class": f"{type(model).__module__}.{type(model).__name__}",
        "drafter_class": f"{type(draft_model).__module__}.{type(draft_model).__name__}",
    }
    return generate, model, tokenizer, draft_model, ready


def fail(message: str) -> NoReturn:
    reply({"error": message})
    sys.exit(2)


def run(generate, model, tokenizer, draft_model, prompt: list[int], n: int, k: int) -> dict:
    """One generation of n tokens through the fork's `stream_generate`, timed from the first
    token to the last (prefill excluded), as `bench.peer` times ours."""
    import mlx.core as mx

    kwargs = {"draft_model": draft_model, "num_draft_tokens": k} if k else {}
    mx.reset_peak_memory()
    times, tokens, from_draft = [], [], []
    for response in generate.stream_generate(model, tokenizer, prompt, max_tokens=n, **kwargs):
        times.append(time.perf_counter())
        tokens.append(int(response.token))
        from_draft.append(bool(response.from_draft))
    elapsed = times[-1] - times[0]
    return {
        "tokens": tokens,
        "from_draft": from_draft,
        "ms_per_token": elapsed * 1e3 / max(len(tokens) - 1, 1),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peer-path", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--drafter", type=Path, required=True)
    args = p.parse_args()
    generate, model, tokenizer, draft_model, ready = start(args.peer_path, args.target, args.drafter)
    reply(ready)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = run(
                generate,
                model,
                tokenizer,
                draft_model,
                request["prompt"],
                request["tokens"],
                request["draft"],
            )
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        reply(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
