"""`python -m bench.compare_loops`: the batched engine at B = 1 against the single-sequence loop
it replaced (commit 9fd1605), in one process on the same weights: is B = 1 as fast as before?

The old package comes out of git under another name, so that both import side by side. Here,
with the git history (after `stage-mlx-cuda.sh`, which empties .device/):

    python -m bench.compare_loops --extract

writes .device/old/mlx_gemma_mtp_old (9fd1605's mlx_gemma_mtp, whose imports are all
relative); carry .device/old to the machine that runs, for instance,

    python -m bench.compare_loops --shapes E2B --bits bf16 --alphas 0 0.8 --ks 7 auto

Both loops get the same random weights (built once by `bench.models`, loaded into the old
classes without a copy), the same prompt, continuation and hits (one draw per position, as
the old bench drew them), so at a fixed k both draft, keep and emit the same tokens and a
pair's time ratio is the loops' own. Each mode runs paired trials in alternating order (old
first, then new first); "plain" is each side's plain decoding (the engine at k = 0). Auto
measures its costs afresh on each side, in the warm-up, into a temporary directory.
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp import costs
from mlx_gemma_mtp.speculative import MAX_DRAFT, drafter_proposer

from . import environment, measure
from .models import CONFIGS, SHAPES, build, configs
from .replay import position_hits, replay_proposer, replay_settled, replay_table

OLD_COMMIT = "9fd1605"
OLD_PACKAGE = "mlx_gemma_mtp_old"
OLD_ROOT = Path(__file__).resolve().parents[1] / ".device" / "old"
OLD_MODULES = ("cache", "config", "costs", "drafter", "generate", "quantize", "speculative", "target")
ABSOLUTE_IMPORT = re.compile(r"^\s*(from|import)\s+mlx_gemma_mtp\b", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# The old package


def extract(root: Path = OLD_ROOT, commit: str = OLD_COMMIT) -> Path:
    """Write `commit`'s mlx_gemma_mtp as root/mlx_gemma_mtp_old (git history needed here)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> bytes:
        done = subprocess.run(["git", "-C", str(repo), *args], check=False, capture_output=True)
        if done.returncode:
            raise SystemExit(
                f"bench.compare_loops: git {' '.join(args)} failed in {repo}: {done.stderr.decode()}"
            )
        return done.stdout

    sha = git("rev-parse", f"{commit}^{{commit}}").decode().strip()
    archive = git("archive", sha, "mlx_gemma_mtp")
    out = root / OLD_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        package = Path(tmp) / "mlx_gemma_mtp"
        check_relative(package)
        shutil.rmtree(out, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(package), out)
    (out / "COMMIT").write_text(sha + "\n")
    return out


def check_relative(package: Path) -> None:
    """Under another name the package must import itself relatively: an absolute import
    would load today's mlx_gemma_mtp into the old loop."""
    bad = [
        f"{path.name}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted(package.glob("*.py"))
        for text in [path.read_text()]
        for m in ABSOLUTE_IMPORT.finditer(text)
    ]
    if bad:
        raise SystemExit(f"bench.compare_loops: absolute imports of mlx_gemma_mtp in the old package: {bad}")


def load_old(root: Path = OLD_ROOT) -> SimpleNamespace:
    """The old package's modules (`extract` first)."""
    if not (root / OLD_PACKAGE / "__init__.py").is_file():
        raise SystemExit(
            f"bench.compare_loops: {root / OLD_PACKAGE} not found: run `python -m bench.compare_loops --extract` "
            "where the git history is, and carry that folder along"
        )
    sys.path.insert(0, str(root))
    modules = {name: importlib.import_module(f"{OLD_PACKAGE}.{name}") for name in OLD_MODULES}
    return SimpleNamespace(**modules, commit=(root / OLD_PACKAGE / "COMMIT").read_text().strip())


def old_pair(old, shape: str, bits: int | None, target, drafter) -> tuple:
    """The old classes holding `target`'s and `drafter`'s very arrays (strict: every name and
    shape must match)."""
    target_json, drafter_json = configs(shape)
    pair = (
        old.target.Target(old.config.target_config(target_json, CONFIGS, tuple(target.config.stop_ids))),
        old.drafter.Drafter(old.config.drafter_config(drafter_json, CONFIGS)),
    )
    for theirs, mine in zip(pair, (target, drafter)):
        if bits is not None:  # the same layers quantized (quantize.py is unchanged since)
            old.quantize.quantize(theirs, bits=bits, group_size=64)
        theirs.load_weights(list(mine.checkpoint_weights().items()), strict=True)
    return pair


# ---------------------------------------------------------------------------------------------
# Runs


def old_run(old, pair, prompt: list[int], n: int, k, propose=None) -> measure.Run:
    """The old loop to n tokens (k = 0 and no proposer: its plain decoding), timed as the old
    bench timed it: from the first token (prefill excluded) to the n-th."""
    target, drafter = pair
    cache = target.make_cache(MAX_DRAFT + 1)
    ids = mx.array([prompt], dtype=mx.int32)
    stats = old.speculative.DraftStats()
    mx.reset_peak_memory()
    if propose is None:
        tokens = old.speculative.plain_tokens(target, ids, cache)
    else:
        policy = old.generate.draft_length(k, target, drafter)
        tokens = old.speculative.speculative_tokens(target, ids, cache, propose, policy, n, stats)
    first = next(tokens)[0]
    start = time.perf_counter()
    rest = [t for t, _ in itertools.islice(tokens, n - 1)]
    elapsed = time.perf_counter() - start
    tokens.close()
    return measure.Run(
        tokens=[[first] + rest], seconds=elapsed, generated=n - 1, full_seconds=elapsed, full_generated=n - 1,
        peak_gb=mx.get_peak_memory() / 1e9,
        drafted=stats.drafted, accepted=stats.accepted, rounds=stats.rounds, draft_lengths=list(stats.k_histogram),
    )  # fmt: skip


def old_replay(old, real, continuation: list[int], hits: np.ndarray, vocab: int):
    """The old bench's replay proposer (9fd1605 bench/measure.py): the drafter runs, then
    position p's draft is continuation[p] where hits[p] (else a wrong token)."""
    known = np.array(continuation + [0] * (len(hits) - len(continuation)), dtype=np.int64)
    replayed = mx.array(np.where(hits, known, (known + 1) % vocab), dtype=mx.int32)

    def propose(request, cache):
        drafted = real(request, cache).tokens
        indices = request.generated + mx.arange(request.k, dtype=mx.int32)
        return old.speculative.Draft(tokens=mx.take(replayed, indices)[None] + drafted * 0)

    return propose


def sides(old, pairs: dict, real: dict, prompt, continuation, alpha, k, n: int) -> dict:
    """'old' and 'new': seed -> a settled run at (alpha, k), both from one draw of hits per
    position; k = None: each side's plain decoding."""
    vocab = pairs["new"][0].args.vocab_size

    def side(name: str):
        def run(seed: int):
            if k is None:
                return (_plain(old, name, pairs[name], prompt, n), 1)
            hits = np.random.RandomState(seed).random_sample(n + MAX_DRAFT + 1) < alpha

            def once(fed):
                if name == "old":
                    return old_run(
                        old, pairs["old"], prompt, n, k, old_replay(old, real["old"], fed[0], hits, vocab)
                    )
                table = replay_table(fed, position_hits(hits[None]), vocab)
                propose = replay_proposer(real["new"], table, [len(prompt)])
                return measure.engine_run(*pairs["new"], [prompt], n, k, propose=propose)

            return replay_settled(once, [continuation])

        return run

    return {"old": side("old"), "new": side("new")}


def _plain(old, name: str, pair, prompt, n: int) -> measure.Run:
    if name == "old":
        return old_run(old, pair, prompt, n, 0)
    return measure.engine_run(pair[0], None, [prompt], n, 0)


def paired(runs: dict, trials: int) -> tuple[dict, int]:
    """Each side warmed up (on a seed no trial uses), then `trials` pairs, old first in even
    trials and new first in odd ones; the most replay passes any run took."""
    out, passes = {"old": [], "new": []}, 1
    for side in ("old", "new"):
        runs[side](trials)
    for trial in range(trials):
        for side in ("old", "new") if trial % 2 == 0 else ("new", "old"):
            run, settled_in = runs[side](trial)
            out[side].append(run)
            passes = max(passes, settled_in)
    return out, passes


def summary(mode: str, alpha, k, runs: dict, passes: int, continuation) -> dict:
    old, new = runs["old"], runs["new"]
    return {
        "mode": mode,
        "alpha": alpha,
        "k": k,
        "old_ms_per_token": statistics.median(r.ms_per_row_token for r in old),
        "new_ms_per_token": statistics.median(r.ms_per_row_token for r in new),
        "new_over_old": statistics.median(o.seconds / m.seconds for o, m in zip(old, new)),  # speed ratio
        "trials_ms": [
            [o.ms_per_row_token, m.ms_per_row_token] for o, m in zip(old, new)
        ],  # (old, new) per pair
        "old_accepted": [r.accepted for r in old],
        "new_accepted": [r.accepted for r in new],
        "old_draft_lengths": {
            str(i): c for i, c in enumerate(map(sum, zip(*(r.draft_lengths for r in old)))) if c
        },
        "new_draft_lengths": {
            str(i): c for i, c in enumerate(map(sum, zip(*(r.draft_lengths for r in new)))) if c
        },
        "old_peak_gb": max(r.peak_gb for r in old),
        "new_peak_gb": max(r.peak_gb for r in new),
        "same_as_plain": min(measure.common_prefix(r.tokens[0], continuation) for r in old + new),
        "replay_passes": passes,
    }


# ---------------------------------------------------------------------------------------------
# The command


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare_loops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--extract", action="store_true", help=f"write {OLD_PACKAGE} from git and exit")
    p.add_argument("--old-root", type=Path, default=OLD_ROOT, help="the folder holding the old package")
    p.add_argument("--shapes", nargs="+", default=["E2B", "31B"], help=f"of {SHAPES} (or 'tiny')")
    p.add_argument("--bits", nargs="+", default=["bf16"], help="bf16 and/or quantization bits (each shape)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.8])
    p.add_argument("--ks", nargs="+", default=["7", "auto"], help="draft lengths: ints, 'auto', 'heuristic'")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/compare-loops.json"))
    return p


def compare_shape(old, shape: str, bits: str, args, result: dict, save) -> None:
    quantized = None if bits == "bf16" else int(bits)
    target, drafter = build(shape, bits=quantized, cycled=False)  # the old classes load its arrays by name
    pairs = {"new": (target, drafter), "old": old_pair(old, shape, quantized, target, drafter)}
    real = {
        "new": drafter_proposer(drafter, target),
        "old": old.speculative.drafter_proposer(*pairs["old"][::-1]),
    }
    prompt = measure.random_prompts(1, args.prompt, target.args.vocab_size, seed=3)[0]
    n = args.tokens
    continuation = measure.engine_run(target, None, [prompt], n, 0).tokens[0]
    result |= {"shape": shape, "bits": bits, "modes": []}
    result["old_plain_same"] = measure.common_prefix(
        old_run(old, pairs["old"], prompt, n, 0).tokens[0], continuation
    )
    modes = [("plain", None, None)] + [
        (f"alpha={a} k={k}", a, k if k in ("auto", "heuristic") else int(k))
        for a in args.alphas
        for k in args.ks
    ]
    for mode, alpha, k in modes:
        runs, passes = paired(sides(old, pairs, real, prompt, continuation, alpha, k, n), args.trials)
        result["modes"].append(summary(mode, alpha, k, runs, passes, continuation))
        save()
        print(_line(result, result["modes"][-1]), flush=True)


def _line(result: dict, mode: dict) -> str:
    return (
        f"{result['shape']} {result['bits']} {mode['mode']}: new/old speed {mode['new_over_old']:.3f}x "
        f"(old {mode['old_ms_per_token']:.2f}, new {mode['new_ms_per_token']:.2f} ms/token), accepted old "
        f"{mode['old_accepted']} new {mode['new_accepted']}, peak {mode['old_peak_gb']:.2f} / {mode['new_peak_gb']:.2f} GB"
    )


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.extract:
        print(f"wrote {extract(args.old_root)}")
        return 0
    old = load_old(args.old_root)
    report = {
        "environment": environment(),
        "old_commit": old.commit,
        "arguments": {k: str(v) for k, v in vars(args).items()},
    }
    report["results"] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    saved = costs.COST_DIR
    with tempfile.TemporaryDirectory() as scratch:  # each side's auto measures its own costs here
        old.costs.COST_DIR, costs.COST_DIR = Path(scratch) / "old", Path(scratch) / "new"
        try:
            for shape in args.shapes:
                for bits in args.bits:
                    result: dict = {}
                    report["results"].append(result)
                    compare_shape(old, shape, bits, args, result, save)
                    mx.clear_cache()
        finally:
            costs.COST_DIR = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
