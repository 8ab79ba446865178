"""`python -m bench.peer`: a peer side by side, the mlx-lm-broomva fork's MTP loop against ours.

Both run the same random-weight target and drafter at a real Gemma 4 shape, read from the same
files: one checkpoint written here that both loaders take (a text-only `gemma4_text` target with
mlx-lm's `model.*` names, a `gemma4_assistant` drafter with transformers' names, a pair
manifest for `mlx_gemma_mtp.load`). Random drafter weights put every drafter's acceptance near
zero (alpha ~ 0): what is compared is what each loop costs when drafting does not pay, the fork
at its fixed draft length against our `num_draft_tokens="auto"` (and at the same fixed length).

The fork's `mlx_lm` shadows ours, so it runs in a Python of its own (`peer_runner.py`, kept
alive across trials); ours runs here, through the public API (`load`, `stream_generate`). Each
trial runs every mode of both sides back to back, so that drift of the device between minutes
cancels in the per-trial ratios. Timing: first token to last (prefill excluded), medians of
`--trials` after one warm-up run of each mode.

Install the fork in a directory of its own, never beside our mlx-lm:
    pip install --no-deps --target /tmp/broomva mlx_lm_broomva-0.31.3-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_gemma_mtp
from mlx_gemma_mtp.quantize import config_block

from . import environment, measure
from .models import SHAPES, CycledInput, build

RUNNER = Path(__file__).with_name("peer_runner.py")
PEER_PACKAGE = "mlx-lm-broomva"
PEER_K = 3  # the fork's CLI default --num-draft-tokens (mlx_lm/generate.py:217, 0.31.3)
SHARD_BYTES = 4 << 30
SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<|turn>", 106: "<turn|>"}
TRANSFORMERS_VERSION = "5.5.0.dev0"  # what Google's E2B config.json names
FIRST_ORDINARY = 107  # prompt ids start above every special and stop id

# What reading mlx-lm-broomva 0.31.3 shows about its loop (file:line of that wheel), recorded
# with every result so that a number is never read without them.
PEER_NOTES = [
    (
        "Entry: mlx_lm.generate.stream_generate(model, tokenizer, prompt, draft_model=..., "
        "num_draft_tokens=k) dispatches to mtp_speculative_generate_step (generate.py:670) when "
        "is_mtp_drafter(draft_model), a duck-typed check for pre_projection and post_projection "
        "(:657); CLI: mlx_lm.generate --model T --draft-model D --num-draft-tokens k (default 3)."
    ),
    (
        "Fixed draft length: k drafts every round, however many are rejected; no schedule, no "
        "k = 0 fallback. Greedy acceptance only (longest matching prefix, :861); sampled "
        "generation compares sampled tokens, not speculative sampling."
    ),
    (
        "Target: its gemma4_text.Model gains return_shared_kv_states=True (gemma4_text.py:578), "
        "returning logits, the hidden state after the final norm and the (keys, values) of the "
        "last layer of each attention type as fetched from the cache; the drafter input is "
        "concat(embed(token) * embed_scale, that hidden) at a position held for the round."
    ),
    (
        "Per round: k drafter steps (each mx.async_eval'd), one verify forward over k+1 tokens "
        "with full-vocabulary logits and a log-softmax of every row, one host sync (:855), "
        "trim of the target cache by k - accepted."
    ),
    (
        "Its drafter's clustered head scatters the top clusters' logits into a full 262,144-wide "
        "row and takes the argmax of that (gemma4_assistant.py MaskedEmbedder); it indexes "
        "embed_tokens.weight directly, so a quantized embedding table (packed uint32) cannot be "
        "gathered."
    ),
    (
        "Its drafter's attention scales scores by head_dim**-0.5 (gemma4_assistant.py "
        "AssistantAttention); Gemma 4 uses 1.0 (transformers modeling_gemma4.py scaling = 1.0, "
        "as its own target does): with real weights its drafts differ from the reference's."
    ),
    (
        "Shared K/V are front-sliced to the accepted length (_trim_shared_kv), exact only while "
        "the context stays inside the sliding window; its target cache is mlx-lm's "
        "RotatingKVCache, checked trimmable only at start (offset < window): once a round wraps "
        "the window, a rewind leaves rejected positions in the ring and the output can leave "
        "the target's own."
    ),
]


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shape", default="E2B", choices=list(SHAPES) + ["tiny"])
    p.add_argument("--bits", default="bf16", choices=["bf16", "4", "8"])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--peer-ks", nargs="+", type=int, default=[PEER_K], help="the fork's draft lengths")
    p.add_argument("--peer-path", type=Path, default=Path("/tmp/broomva"), help="where the fork is installed")
    p.add_argument("--workdir", type=Path, default=None, help="write the checkpoint here and keep it")
    p.add_argument("--out", type=Path, default=Path("bench/results/peer.json"))
    p.add_argument(
        "--quantized-drafter-embedding",
        action="store_true",
        help="keep a quantized drafter's embedding table quantized (the fork's clustered head fails on it)",
    )
    p.add_argument(
        "--no-calm",
        action="store_true",
        help="a random target as drawn (bench.models.calm not applied): outputs then show "
        "whether each loop stays exact; on CUDA, rounding alone may part them",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, short runs: a CPU check")
    return p


# ------------------------------------------------------------------------------------------
# The shared checkpoint


def write_pair(target, drafter, root: Path, dense_drafter_embedding: bool = False) -> Path:
    """Write `target` and `drafter` (as built by `bench.models.build`) where both runtimes load
    them: root/target, root/drafter and our pair manifest. Returns root.

    dense_drafter_embedding: write a quantized drafter's embedding table dequantized (the
    fork's clustered head gathers rows of `embed_tokens.weight` itself, which a packed table
    does not have); both sides then load that table unquantized.
    """
    if isinstance(target.model.embed_tokens, CycledInput):
        raise ValueError(
            "write_pair: a cycled target (bench.models.cycle) cannot be written: build it with cycled=False"
        )
    args = target.args
    target_config = {
        **dataclasses.asdict(args),  # every field explicit: both loaders read the same values
        "model_type": "gemma4_text",
        "eos_token_id": list(target.config.stop_ids),
        # As real checkpoints have it; without it transformers' tokenizer loading warns of a
        # Mistral regex (tokenization_utils_tokenizers.py, 5.17).
        "transformers_version": TRANSFORMERS_VERSION,
    }
    drafter_config = {
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": drafter.config.backbone_hidden_size,
        "use_ordered_embeddings": drafter.config.use_ordered_embeddings,
        "num_centroids": drafter.config.num_centroids,
        "centroid_intermediate_top_k": drafter.config.centroid_intermediate_top_k,
        "tie_word_embeddings": True,
        "vocab_size": drafter.args.vocab_size,
        "text_config": dataclasses.asdict(drafter.args),
        "transformers_version": TRANSFORMERS_VERSION,
    }
    for role, model, config in (("target", target, target_config), ("drafter", drafter, drafter_config)):
        out = root / role
        out.mkdir(parents=True, exist_ok=True)
        block = _quantization_block(model)
        if block:
            config["quantization"] = block
        weights = model.checkpoint_weights()
        if model is drafter and dense_drafter_embedding:
            weights = _dequantized(weights, "model.embed_tokens", block)
        _write_weights(weights, out)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        write_tokenizer(out, args.vocab_size)
    manifest = {"format": "mlx-gemma-mtp pair", "target": "target", "drafter": "drafter"}
    (root / "mlx-gemma-mtp.json").write_text(json.dumps(manifest))
    return root


def _quantization_block(model) -> dict | None:
    """config.json's `quantization` block for a model quantized in memory (None if it is not)."""
    recipe = {
        path: {"group_size": m.group_size, "bits": m.bits}
        for path, m in model.named_modules()
        if hasattr(m, "scales") and hasattr(m, "bits")
    }
    if not recipe:
        return None
    default = statistics.mode((p["bits"], p["group_size"]) for p in recipe.values())
    return config_block(default[0], default[1], recipe)


def _dequantized(weights: dict[str, mx.array], layer: str, block: dict | None) -> dict[str, mx.array]:
    if f"{layer}.scales" not in weights:
        return weights
    params = block.get(layer, block)
    scales, biases = weights.pop(f"{layer}.scales"), weights.pop(f"{layer}.biases")
    dense = mx.dequantize(weights[f"{layer}.weight"], scales, biases, params["group_size"], params["bits"])
    weights[f"{layer}.weight"] = dense.astype(scales.dtype)
    return weights


def _write_weights(weights: dict[str, mx.array], out: Path) -> None:
    shards, size = [[]], 0
    for name, value in weights.items():
        if shards[-1] and size + value.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    for i, names in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), {n: weights[n] for n in names}, metadata={"format": "mlx"})


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one piece per id and Gemma's special ids and decoder (so
    both mlx-lm versions stream with their cheap SPM detokenizer): enough to run generation
    on token ids and detokenize them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"▁w{i}": i for i in range(vocab_size) if i not in SPECIAL_TOKENS}
    vocab.update({text: i for i, text in SPECIAL_TOKENS.items()})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


# ------------------------------------------------------------------------------------------
# The two sides


def check_peer_path(path: Path) -> None:
    if not (path / "mlx_lm" / "generate.py").is_file():
        raise SystemExit(
            f"bench.peer: {path}/mlx_lm/generate.py not found: install the fork there with "
            f"`pip install --no-deps --target {path} mlx_lm_broomva-*.whl` (or pass --peer-path)"
        )


@contextlib.contextmanager
def peer_process(peer_path: Path, pair: Path):
    """(ready message, request(k, n, prompt) -> run dict) of a live `peer_runner.py`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(peer_path), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-P", str(RUNNER), "--peer-path", str(peer_path),
               "--target", str(pair / "target"), "--drafter", str(pair / "drafter")]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def receive() -> dict:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"bench.peer: the peer process exited (code {process.wait()}) without answering")
        return json.loads(line)

    def request(k: int, n: int, prompt: list[int]) -> dict:
        process.stdin.write(json.dumps({"draft": k, "tokens": n, "prompt": prompt}) + "\n")
        process.stdin.flush()
        return receive()

    try:
        ready = receive()
        if "error" in ready:
            raise SystemExit(f"bench.peer: {ready['error']}")
        yield ready, request
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ours_run(model, tokenizer, drafter, prompt: list[int], n: int, k: int | str) -> dict:
    """One generation through our public `stream_generate`, timed as the peer's is."""
    drafter = drafter if k != 0 else None
    times, tokens, last = [], [], None
    stream = mlx_gemma_mtp.stream_generate(
        model, tokenizer, prompt, n, draft_model=drafter, num_draft_tokens=k if drafter else 0
    )
    for last in stream:
        times.append(time.perf_counter())
        tokens.append(last.token)
    return {
        "tokens": tokens,
        "ms_per_token": (times[-1] - times[0]) * 1e3 / max(len(tokens) - 1, 1),
        "peak_gb": last.peak_memory,
        "drafted": last.drafted,
        "accepted": last.accepted,
        "mean_accepted": last.mean_accepted,
        "draft_lengths": {length: rounds for length, rounds in enumerate(last.draft_lengths) if rounds},
    }


def peer_drafting(from_draft: list[bool], k: int, n: int) -> dict:
    """Drafted and accepted counts of a fork run, from its from_draft flags: after the first
    (seed) token, each round drafts min(k, n - generated) and yields its accepted drafts
    (from_draft) then one target token."""
    drafted = accepted = rounds = 0
    generated, i = 1, 1
    while i < len(from_draft):
        rounds += 1
        drafted += min(k, n - generated)
        hits = 0
        while i < len(from_draft) and from_draft[i]:
            hits, i = hits + 1, i + 1
        accepted += hits
        generated += hits + 1
        i += 1
    return {"drafted": drafted, "accepted": accepted, "mean_accepted": accepted / max(rounds, 1)}


# ------------------------------------------------------------------------------------------
# The benchmark


def random_prompt(length: int, vocab: int, seed: int = 3) -> list[int]:
    return np.random.RandomState(seed).randint(FIRST_ORDINARY, vocab, size=length).tolist()


def compare(args, pair: Path) -> dict:
    model, tokenizer, drafter = mlx_gemma_mtp.load_pair(pair)
    vocab, window = model.args.vocab_size, model.args.sliding_window
    prompt = random_prompt(args.prompt, vocab)
    n = args.tokens
    ours_modes = {"plain": 0, "auto": "auto", **{f"k={k}": k for k in args.peer_ks}}
    peer_modes = {"plain": 0, **{f"k={k}": k for k in args.peer_ks}}
    runs = {("ours", m): [] for m in ours_modes} | {("peer", m): [] for m in peer_modes}
    errors = {}  # (who, mode) -> what the fork raised; that mode is not run again
    with peer_process(args.peer_path, pair) as (ready, peer):
        print(
            f"peer: {ready['package']} {ready['version']} on {ready['device']} ({ready['mlx_lm_file']})",
            flush=True,
        )
        for trial in range(args.trials + 1):  # trial 0 is the warm-up (and our "auto" cost measurement)
            for mode, k in ours_modes.items():
                run = ours_run(model, tokenizer, drafter, prompt, n, k)
                if trial:
                    runs["ours", mode].append(run)
            for mode, k in peer_modes.items():
                if ("peer", mode) in errors:
                    continue
                run = peer(k, n, prompt)
                if "error" in run:
                    errors["peer", mode] = run["error"]
                    print(f"peer {mode} failed: {run['error']}", flush=True)
                    continue
                if k:
                    run |= peer_drafting(run["from_draft"], k, n)
                if trial:
                    runs["peer", mode].append(run)
            if trial:
                times = [f"{who} {mode} {r[-1]['ms_per_token']:.2f}" for (who, mode), r in runs.items() if r]
                print(f"trial {trial} (ms/token): " + ", ".join(times), flush=True)
    reference = runs["ours", "plain"][0]["tokens"]
    summary = [
        {"who": who, "mode": mode, "error": errors[who, mode]}
        if (who, mode) in errors
        else _summary(who, mode, trials, reference, runs)
        for (who, mode), trials in runs.items()
    ]
    return {
        "peer": {key: value for key, value in ready.items() if key != "ready"} | {"notes": PEER_NOTES},
        "shape": args.shape,
        "bits": args.bits,
        "prompt_tokens": args.prompt,
        "tokens": n,
        "sliding_window": window,
        # The fork rewinds its RotatingKVCache exactly only before the window wraps.
        "within_window": args.prompt + n + max(args.peer_ks) <= window,
        "runs": summary,
    }


def _summary(who: str, mode: str, trials: list[dict], reference: list[int], runs: dict) -> dict:
    ms = statistics.median(r["ms_per_token"] for r in trials)
    out = {
        "who": who,
        "mode": mode,
        "ms_per_token": ms,
        "tokens_per_s": 1e3 / ms,
        "ms_per_token_trials": [r["ms_per_token"] for r in trials],
        "peak_gb": max(r["peak_gb"] for r in trials),
        "same_as_our_plain": measure.common_prefix(trials[0]["tokens"], reference),
        "reproducible": all(r["tokens"] == trials[0]["tokens"] for r in trials),
    }
    # Per trial, a plain run's time over this run's (the two ran back to back), then the median.
    for key, plain in (
        ("speedup_over_own_plain", runs[who, "plain"]),
        ("speedup_over_peer_plain", runs["peer", "plain"]),
    ):
        if plain:
            out[key] = statistics.median(p["ms_per_token"] / r["ms_per_token"] for p, r in zip(plain, trials))
    if mode != "plain":
        first = trials[0]
        out |= {
            key: first[key]
            for key in ("drafted", "accepted", "mean_accepted", "draft_lengths")
            if key in first
        }
        out["acceptance_rate"] = first["accepted"] / first["drafted"] if first["drafted"] else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.quick:
        args.shape, args.bits, args.prompt, args.tokens, args.trials = "tiny", "bf16", 24, 32, 3
    check_peer_path(args.peer_path)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        # Not cycled: both sides load the pair from files, which cannot carry the cycle.
        target, drafter = build(
            args.shape,
            bits=None if args.bits == "bf16" else int(args.bits),
            calm_target=not args.no_calm,
            cycled=False,
        )
        clustered = drafter.config.use_ordered_embeddings  # only the fork's clustered head needs it
        dense_embedding = args.bits != "bf16" and clustered and not args.quantized_drafter_embedding
        write_pair(target, drafter, workdir, dense_drafter_embedding=dense_embedding)
        del target, drafter  # each side loads its own copy from the files
        mx.clear_cache()
        result = compare(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["drafter_embedding"] = "unquantized (for the fork)" if dense_embedding else "as the rest"
    report = {"environment": environment(), "arguments": {k: str(v) for k, v in vars(args).items()}} | result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for run in result["runs"]:
        print(_line(run), flush=True)
    return 0


def _line(run: dict) -> str:
    if "error" in run:
        return f"{run['who']:4} {run['mode']:6} failed: {run['error']}"
    peer_plain = (
        f"  x{run['speedup_over_peer_plain']:.2f} of peer plain" if "speedup_over_peer_plain" in run else ""
    )
    acceptance = f", acceptance {run['acceptance_rate']:.2f}" if "acceptance_rate" in run else ""
    return (
        f"{run['who']:4} {run['mode']:6} {run['ms_per_token']:8.2f} ms/token {run['tokens_per_s']:8.1f} tok/s"
        f"{peer_plain}{acceptance}, same as our plain for "
        f"{run['same_as_our_plain']} tokens"
    )


if __name__ == "__main__":
    sys.exit(main())
