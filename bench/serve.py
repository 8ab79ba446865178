"""`python -m bench.serve`: aggregate tokens/s of `mlx-gemma-mtp serve` with 1, 4, 8, 16
concurrent clients over loopback, against the in-process batched engine at the same batch (the
server's overhead) and against `mlx_lm.server` serving the same target without a drafter.

One random-weight checkpoint at a real Gemma 4 shape (`bench.models.build`; `--shape tiny`
for a CPU check) is written where both servers load it (`bench.peer.write_pair`). The servers run
as subprocesses, as users start them:

- every client sends `--requests` /v1/completions requests back to back, each a different
  random `--prompt`-token prompt, greedy, `--tokens` tokens at most; the in-process engine keeps
  the same number of rows in flight over the same prompts, and keeps finished rows' caches as
  the server does (`--prefix-cache`'s default; from r50 on: before, it kept none);
- tokens/s = completion tokens of all requests / wall time from the first request to the last
  answer; the median of `--trials` after one warm-up round at the largest client count. Also
  "until the last request was sent" (`_steady`): while every client still had requests to send,
  without the run's tail of a few clients' last requests (with several requests a client).

The sides of a case are up together (the servers idle while another side runs), and their
trials alternate, the order turning each trial: a card whose speed drifts by 20% from one
minute to the next (H100s do) moves every side alike. A ratio is the median of the trials'
paired ratios. The card has to hold every side's copy of the model at once.

The drafter's weights are random, so acceptance is what a random drafter gets (alpha ~ 0):
`auto` then mostly decodes plainly, and the comparison with mlx_lm.server shows what the
server costs when drafting does not pay. `--alphas 0.8` measures ours again at a replayed
acceptance (`bench.replay`): each prompt's plain greedy continuation, computed first, is drafted
right at that chance; the server runs as `python -m bench.serve_replay`, the engine in process
with the same proposer, and every request carries its prompt's index as its seed, by which
the drafts are looked up. Where a backend's batched rounding drifts a row off its plain
continuation (MLX CUDA), that row's acceptance falls below alpha: the measured mean accepted
per round says so.

The report's `seconds` times each step as it went (the checkpoint built and written, the
replays, each side up, each case's trials): r51 spent ~6 of its 7 minutes before its first
trial, which decides what fits a 10-minute device call. A request that fails ends the run
naming its side and whether that side's process died (its output is on stderr).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np

from mlx_gemma_mtp import load_pair
from mlx_gemma_mtp.cli import PREFIX_CACHE
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.generate import draft_length
from mlx_gemma_mtp.sample import make_sampling
from mlx_gemma_mtp.worker import Stats

from . import environment, measure
from .models import SHAPES, build
from .peer import FIRST_ORDINARY, write_pair
from .replay import draw_hits, parse_acceptance, replay_table
from .serve_replay import replayed

SIDES = ("serve", "engine", "mlx_lm")
START_TIMEOUT = 1800  # seconds: loading a large model and measuring draft costs on first use


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", default="E2B", choices=list(SHAPES) + ["tiny"])
    p.add_argument("--bits", default="4", choices=["bf16", "4", "8"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument(
        "--requests",
        type=int,
        default=4,
        help="requests per client per trial (the fewer, the more the run's tail of last requests "
        "weighs in its tokens/s; the rate until the last request was sent leaves it out)",
    )
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="max tokens per request")
    p.add_argument("-k", "--num-draft-tokens", default="auto", help="ours: an int or 'auto'")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument(
        "--alphas",
        nargs="*",
        type=float,
        default=[],
        help="ours (serve, engine) also at these replayed acceptances; requests then carry seeds",
    )
    p.add_argument(
        "--replayed-only",
        action="store_true",
        help="only the --alphas cases, not the random drafter's own (mlx_lm, which has no drafter, then sits out)",
    )
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--port", type=int, default=8391)
    p.add_argument("--workdir", type=Path, default=None, help="write the checkpoint here and keep it")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    p.add_argument("--quick", action="store_true", help="tiny model, few short requests: a CPU check")
    return p


def prompts(n: int, length: int, vocab: int, seed: int = 5) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(FIRST_ORDINARY, vocab, size=length).tolist() for _ in range(n)]


def as_text(ids: list[int]) -> str:
    """The text `bench.peer.write_tokenizer`'s tokenizer encodes to exactly `ids` (one word per id)."""
    return " ".join(f"▁w{i}" for i in ids)


# ------------------------------------------------------------------------------------------
# Clients


def drive(url: str, texts: list[str], clients: int, tokens: int, seeds: bool = False) -> dict:
    """`clients` threads send `texts` as completions back to back; the run's totals. seeds:
    each request's seed is its text's index (a replaying server looks its drafts up by it)."""
    queue = iter(enumerate(texts))
    records: list[dict] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            for index, text in queue:  # the iterator is shared: each text goes to one client
                start = time.perf_counter()
                body = {"prompt": text, "max_tokens": tokens, "temperature": 0.0}  # mlx_lm: one model
                if seeds:
                    body["seed"] = index
                response = http.post(f"{url}/v1/completions", json=body)
                response.raise_for_status()
                answer = response.json()
                records.append(
                    {
                        "tokens": answer["usage"]["completion_tokens"],
                        "start": start - began,
                        "end": time.perf_counter() - began,
                        "drafting": answer.get("drafting"),
                    }
                )

    before = _worker_stats(url)
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - began
    after = _worker_stats(url)
    stats = (
        None
        if before is None or after is None
        else Stats(*(a - b for a, b in zip(astuple(after), astuple(before))))
    )
    return _totals(records, wall, stats)


def _worker_stats(url: str) -> Stats | None:
    """Our server's worker totals so far (`/health`); None from a server without them (mlx_lm)."""
    engine = httpx.get(f"{url}/health", timeout=60).json().get("engine")
    return None if engine is None else Stats(**engine)


def _totals(records: list[dict], wall: float, stats: Stats | None = None) -> dict:
    """A trial's totals; `stats`: what the engine's steps did in it (where the time went)."""
    tokens = sum(r["tokens"] for r in records)
    out = {"requests": len(records), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
    if stats is not None and stats.steps:
        out["steps"] = stats.steps
        out["rows_per_step"] = stats.rows / stats.steps  # how full the batch ran
        out["ms_per_step"] = stats.step_seconds / stats.steps * 1e3
        out["device_share"] = stats.device_wait_seconds / wall  # near 1: the device was the limit
        out["join_wait_share"] = stats.join_wait_seconds / wall
        if stats.refills:  # from a row's end until a request followed (its client's next, over HTTP)
            out["refill_ms"] = stats.refill_seconds / stats.refills * 1e3
        if stats.drafting_rows:  # the drafting rounds' k (a row-round each): its mean and spread
            mean = stats.drafted / stats.drafting_rows
            out["k_mean"] = mean
            out["k_sd"] = max(stats.drafted_squares / stats.drafting_rows - mean * mean, 0.0) ** 0.5
    if records:
        out["median_request_s"] = statistics.median(r["end"] - r["start"] for r in records)
        out["steady_tokens_per_s"] = _steady(records)
    drafting = [r["drafting"] for r in records if r.get("drafting")]
    if drafting:
        rounds = sum(d["rounds"] for d in drafting)
        out["drafted"] = sum(d["drafted"] for d in drafting)
        out["accepted"] = sum(d["accepted"] for d in drafting)
        out["mean_accepted"] = out["accepted"] / rounds if rounds else 0.0
    return out


def _steady(records: list[dict]) -> float:
    """Tokens per second until the last request was sent, while every client had one to send
    (the run's tail of a few clients' last requests left out): a request running across that
    moment counts its tokens in proportion to its time before it. A run of one request: its own."""
    cut = max(r["start"] for r in records)
    if cut <= 0:
        return sum(r["tokens"] for r in records) / max(r["end"] for r in records)
    done = sum(
        r["tokens"] * min(max((cut - r["start"]) / (r["end"] - r["start"]), 0.0), 1.0) for r in records
    )
    return done / cut


@contextlib.contextmanager
def server_process(command: list[str], url: str, health: str):
    """A server subprocess, up once `health` answers 200 (yielded); SIGTERM and wait at the end."""
    process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {process.returncode} before serving")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{health}", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not answer {health} in {START_TIMEOUT} s")
            time.sleep(1)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_command(
    side: str, pair: Path, args, port: int, replay: Path | None = None
) -> tuple[list[str], str]:
    """The command line of a server side and its health path; ours replays `replay`'s drafts."""
    batch = str(max(args.clients))
    if side == "serve":
        server = (
            ["mlx_gemma_mtp", "serve"] if replay is None else ["bench.serve_replay", "--replay", str(replay)]
        )
        command = [sys.executable, "-m", *server, str(pair), "--port", str(port)]
        command += ["--max-batch", batch, "-k", str(args.num_draft_tokens), "--log-level", "warning"]
        return command, "/health"
    command = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(pair / "target"),
        "--port",
        str(port),
    ]
    return command + ["--decode-concurrency", batch, "--log-level", "WARNING"], "/health"


@contextlib.contextmanager
def open_server(side: str, pair: Path, texts: list[str], args, port: int, replay: Path | None = None):
    """A server side, up and warmed: yields run(clients) -> one trial's totals."""
    url = f"http://127.0.0.1:{port}"
    command, health = serve_command(side, pair, args, port, replay)
    seeds = replay is not None
    with server_process(command, url, health) as process:

        def run(clients: int, sent: list[str]) -> dict:
            try:
                return drive(url, sent, clients, args.tokens, seeds)
            except httpx.HTTPError as error:  # which side failed, and whether its process died
                raise RuntimeError(f"{side} ({url}): {error!r}; {_fate(process)}") from error

        run(max(args.clients), texts[: max(args.clients)])  # warm-up
        yield lambda c: run(c, texts[: c * args.requests])


def _fate(process: subprocess.Popen, wait: float = 5.0) -> str:
    """Whether a server whose request failed has died (given `wait` s to be reaped) or runs on."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(wait)
    if process.returncode is None:
        return "its process is still running"
    return f"its process exited with {process.returncode} (its output is above, on stderr)"


# ------------------------------------------------------------------------------------------
# The in-process engine


def engine_run(engine, ids: list[list[int]], clients: int, tokens: int, seeds: bool = False) -> dict:
    """Keep `clients` rows in flight over `ids`, as the server's clients do (seeds: as `drive`)."""
    pending, in_flight, records, added, stats = list(enumerate(ids)), 0, [], {}, Stats()
    start = time.perf_counter()
    while pending or engine.busy:
        while pending and in_flight < clients:
            index, prompt = pending.pop(0)
            sampling = make_sampling(seed=index) if seeds else make_sampling()
            added[engine.add(Request(prompt=prompt, max_tokens=tokens, sampling=sampling))] = (
                time.perf_counter()
            )
            stats.row_added(time.perf_counter())
            in_flight += 1
        began = time.perf_counter()
        events = engine.step()
        stats.count_step(engine, time.perf_counter() - began)
        for event in events:
            if event.finish_reason is not None:
                in_flight -= 1
                stats.row_ended()
                u = event.usage
                drafting = {"drafted": u.drafted, "accepted": u.accepted, "rounds": u.rounds}
                records.append(  # timed as a client times its request
                    {
                        "tokens": u.generation_tokens,
                        "start": added.pop(event.rid) - start,
                        "end": time.perf_counter() - start,
                        "drafting": drafting,
                    }
                )
    return _totals(records, time.perf_counter() - start, stats)


@contextlib.contextmanager
def open_engine(pair: Path, ids: list[list[int]], args, replay: Path | None = None):
    """The in-process engine (its own copy of the model), warmed: yields run(clients)."""
    model, _, drafter = load_pair(pair)
    propose = None if replay is None else replayed(str(replay))(model, drafter)
    seeds = replay is not None
    k = (
        args.num_draft_tokens
        if args.num_draft_tokens in ("auto", "heuristic")
        else int(args.num_draft_tokens)
    )
    policy = draft_length(k, model, drafter, max(args.clients))
    engine = Engine(
        model,
        drafter,
        num_draft_tokens=policy,
        max_batch=max(args.clients),
        prefix_cache_size=PREFIX_CACHE,  # as the server's, so that the two sides keep alike
        propose=propose,
    )
    engine_run(engine, ids[: max(args.clients)], max(args.clients), args.tokens, seeds)  # warm-up
    yield lambda c: engine_run(engine, ids[: c * args.requests], c, args.tokens, seeds)
    # the engine and models go with this frame; main clears MLX's cache after


def run_case(sides: dict, clients: int, trials: int) -> dict:
    """`trials` rounds over the sides (label -> run), the order turning each round: per side the
    first trial's totals with the median tokens/s, and every trial's tokens/s in order."""
    labels, runs = list(sides), {label: [] for label in sides}
    for t in range(trials):
        turn = t % len(labels)
        for label in labels[turn:] + labels[:turn]:
            runs[label].append(sides[label](clients))
    out = {}
    for label, trial_runs in runs.items():
        best = dict(trial_runs[0])
        best["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in trial_runs)
        best["tokens_per_s_trials"] = [r["tokens_per_s"] for r in trial_runs]
        if all("steady_tokens_per_s" in r for r in trial_runs):
            best["steady_tokens_per_s_trials"] = [r["steady_tokens_per_s"] for r in trial_runs]
        out[label] = best
    return out


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.replayed_only and not args.alphas:
        parser.error("--replayed-only measures the --alphas cases: name at least one")
    if args.quick:
        args.shape, args.bits, args.clients, args.requests = "tiny", "bf16", [1, 4], 2
        args.prompt, args.tokens, args.trials = 32, 16, 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        seconds, clock = {}, time.perf_counter()  # each step's, setup and trials: to plan a run by

        def lap(step: str) -> None:
            nonlocal clock
            seconds[step] = time.perf_counter() - clock
            clock += seconds[step]
            print(f"{step}: {seconds[step]:.0f} s", flush=True)

        bits = None if args.bits == "bf16" else int(args.bits)
        target, drafter = build(args.shape, bits=bits, cycled=False)  # written to files: no cycle
        vocab = target.args.vocab_size
        lap("built")
        write_pair(target, drafter, workdir)
        del target, drafter  # each side loads its own copy from the files
        mx.clear_cache()
        lap("written")
        ids = prompts(max(args.clients) * args.requests, args.prompt, vocab)
        texts = [as_text(p) for p in ids]
        replays = write_replays(workdir, ids, args)
        lap("replays")
        results: dict = {}
        for alpha in [*([] if args.replayed_only else [None]), *args.alphas]:
            replay, case = replays.get(alpha), "" if alpha is None else f" alpha={alpha}"
            with contextlib.ExitStack() as stack:
                sides = {}  # up one after another: the first measures draft costs, the next reads them
                for i, side in enumerate(name for name in args.sides if alpha is None or name != "mlx_lm"):
                    sides[side + case] = stack.enter_context(
                        open_engine(workdir, ids, args, replay)
                        if side == "engine"
                        else open_server(side, workdir, texts, args, args.port + i, replay)
                    )
                    lap(f"{side}{case} up")
                for clients in args.clients:
                    for label, run in run_case(sides, clients, args.trials).items():
                        results.setdefault(label, {})[clients] = run
                        print(_line(label, clients, run), flush=True)
                    lap(f"{case.strip() or 'own drafter'}, {clients} clients")
                    report = save(results, args, seconds)  # after every step: a run cut short keeps it
            mx.clear_cache()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for line in _ratio_lines(report):
        print(line)
    return 0


def save(results: dict, args, seconds: dict) -> dict:
    report = {"environment": environment(), "arguments": {k: str(v) for k, v in vars(args).items()}}
    report["seconds"] = dict(seconds)  # each step of the run so far, its trials included
    report["results"] = {side: {str(c): run for c, run in runs.items()} for side, runs in results.items()}
    report["ratios"] = _ratios(results)
    report["steady_ratios"] = _ratios(results, "steady_tokens_per_s_trials")
    report["added_seconds"] = _added_seconds(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


def write_replays(pair: Path, ids: list[list[int]], args) -> dict[float, Path]:
    """Per alpha, the .npz of drafts `bench.serve_replay` and the engine replay: each prompt's
    plain greedy continuation (our engine, all prompts in one batch), right at that alpha."""
    if not args.alphas:
        return {}
    model, _, _ = load_pair(pair)
    continuations = measure.engine_run(model, None, ids, args.tokens, 0).tokens
    out = {}
    for alpha in args.alphas:
        chances = parse_acceptance(f"alpha={alpha}").chances(len(ids))
        table = replay_table(
            continuations, draw_hits(chances, args.tokens + 1, seed=7), model.args.vocab_size
        )
        out[alpha] = pair / f"replay-{alpha}.npz"
        np.savez(out[alpha], table=np.array(table), prompt_lens=np.array([len(p) for p in ids]))
    del model
    mx.clear_cache()
    return out


def _ratios(results: dict, trials: str = "tokens_per_s_trials") -> dict:
    """Per client count and case: our server's tokens/s over the in-process engine's and over
    mlx_lm.server's, the median of the paired trials' ratios (`trials`: which tokens/s)."""
    out = {}
    for label in [label for label in results if label.startswith("serve")]:
        case = label[len("serve") :]
        for other in ("engine" + case, "mlx_lm"):
            if other in results:
                serve, base = results[label], results[other]
                out[f"{label}/{other}"] = {
                    str(c): statistics.median(a / b for a, b in zip(serve[c][trials], base[c][trials]))
                    for c in serve
                    if c in base and trials in serve[c] and trials in base[c]
                }
    return out


def _added_seconds(results: dict) -> dict:
    """Per client count and case: what a request takes longer through the server than through
    the engine (the medians of their first trials, seconds): queueing, HTTP and the wait for the
    batch's next step."""
    out = {}
    for label in [label for label in results if label.startswith("serve")]:
        engine = "engine" + label[len("serve") :]
        if engine in results:
            serve, base = results[label], results[engine]
            out[f"{label} - {engine}"] = {
                str(c): serve[c]["median_request_s"] - base[c]["median_request_s"] for c in serve if c in base
            }
    return out


def _line(side: str, clients: int, run: dict) -> str:
    drafting = f", mean accepted {run['mean_accepted']:.2f}" if "mean_accepted" in run else ""
    if "k_mean" in run:
        drafting += f" of k {run['k_mean']:.1f} ± {run['k_sd']:.1f}"
    latency = f", median request {run['median_request_s']:.2f} s" if "median_request_s" in run else ""
    steady = (
        f", {run['steady_tokens_per_s']:.1f} until the last was sent" if "steady_tokens_per_s" in run else ""
    )
    steps = (
        f"; {run['rows_per_step']:.1f} rows a step of {run['ms_per_step']:.1f} ms, waiting for the device "
        f"{run['device_share']:.0%}, for requests {run['join_wait_share']:.0%}"
        + (f", the next request {run['refill_ms']:.1f} ms after a row ended" if "refill_ms" in run else "")
        if "rows_per_step" in run
        else ""
    )
    return (
        f"{side:7} {clients:3} clients: {run['tokens_per_s']:8.1f} tok/s ({run['requests']} requests"
        f"{steady}{latency}{drafting}{steps})"
    )


def _ratio_lines(report: dict) -> list[str]:
    ratios = [
        f"{name}{kind}: " + ", ".join(f"{c} clients x{r:.3f}" for c, r in by.items())
        for key, kind in (("ratios", ""), ("steady_ratios", ", until the last request was sent"))
        for name, by in report[key].items()
    ]
    return ratios + [
        f"{name}, a request: " + ", ".join(f"{c} clients {s * 1e3:+.0f} ms" for c, s in by.items())
        for name, by in report["added_seconds"].items()
    ]


if __name__ == "__main__":
    sys.exit(main())
