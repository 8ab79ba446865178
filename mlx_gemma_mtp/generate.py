"""Text in, text out: `generate`, `stream_generate` and `batch_generate` over the engine.

The public functions take mlx-lm's keywords (`max_tokens`, `draft_model`, `temperature`,
`top_p`, ...), build one checked `Sampling` at the boundary and hand it inward. Every call
is a run of the batched engine (`engine.py`); a single prompt is a batch of one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .costs import batch_sizes, load_costs
from .draft_length import MAX_DRAFT, Auto, DraftLength, Heuristic
from .drafter import Drafter
from .engine import Engine, Event, PromptCache, Request, Usage, check_request
from .sample import SEED_LIMIT, Sampling, make_sampling
from .target import Target
from .threads import clear_streams_at_thread_exit

DRAFT_SCHEDULES = ("auto", "heuristic")
# Every entry point (the functions here, ChatSession, the CLI, the server) generates at most this
# many tokens unless told otherwise: Gemma 4 answers often think first, and mlx-lm's 256 cuts
# most such answers short. Generation also ends where the model's context does.
DEFAULT_MAX_TOKENS = 1024
# What `make_sampling` takes: the sampling keywords every public function passes on.
SAMPLING_KEYWORDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size",
    "logits_processors", "seed",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Response:
    """One generated token and the running statistics of its generation."""

    text: str  # new text this token completes (may be empty mid-character; "" for a stop id)
    token: int
    from_draft: bool  # proposed by the drafter and accepted, rather than the target's own
    prompt_tokens: int  # prompt tokens prefilled by this call (a reused cache holds the rest)
    generation_tokens: int  # tokens generated so far, this one included
    drafted: int  # draft tokens proposed so far
    accepted: int  # draft tokens accepted so far
    prompt_tps: float  # prompt tokens per second of prefill
    generation_tps: float  # generated tokens per second since the first one
    peak_memory: float  # GB, since this generation started
    finish_reason: str | None  # "stop" (a stop id), "length" (max_tokens) or None
    # Drafting so far (the last response has the generation's totals):
    acceptance_rate: float  # accepted / drafted (0.0 before any draft)
    mean_accepted: float  # drafts accepted per drafting round
    draft_lengths: tuple[int, ...]  # rounds per drafted length k = 0..MAX_DRAFT (k = 0: a plain step)


def make_prompt_cache(model: Target) -> PromptCache:
    """An empty conversation cache for `prompt_cache=`: each call continues from what it holds."""
    return PromptCache()


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids (a string is encoded, with BOS unless it starts with one)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty: nothing to continue from")
        bos = tokenizer.bos_token
        return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    if not isinstance(prompt, Sequence):
        raise TypeError(f"prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise TypeError("prompt must be a str or a list of int token ids")
    return list(prompt)


def stop_ids(model: Target, tokenizer: TokenizerWrapper) -> frozenset[int]:
    """Every id that ends a generation: the checkpoint's and the tokenizer's."""
    return frozenset(model.config.stop_ids) | frozenset(tokenizer.eos_token_ids)


def sampling_from(caller: str, options: dict) -> Sampling:
    """The one `Sampling` of a call's sampling keywords (ValueError naming a bad value)."""
    unknown = sorted(set(options) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword arguments {unknown} (sampling takes {SAMPLING_KEYWORDS})"
        )
    return make_sampling(**options)


def check_draft_length(num_draft_tokens) -> None:
    fixed = isinstance(num_draft_tokens, int) and not isinstance(num_draft_tokens, bool)
    if not ((fixed and 0 <= num_draft_tokens <= MAX_DRAFT) or num_draft_tokens in DRAFT_SCHEDULES):
        raise ValueError(
            f"num_draft_tokens must be an int in 0..{MAX_DRAFT}, 'heuristic' or 'auto', got {num_draft_tokens!r}"
        )


def check_arguments(caller: str, max_tokens, options: dict) -> None:
    """What `stream_generate` checks at the call, for a caller that calls it later
    (`ChatSession`): max_tokens, num_draft_tokens and the sampling keywords."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    options = dict(options)
    check_draft_length(options.pop("num_draft_tokens", "auto"))
    sampling_from(caller, options)


def draft_length(
    num_draft_tokens: int | str, model: Target, draft_model: Drafter | None, max_batch: int = 1
) -> int | DraftLength:
    """The policy behind `num_draft_tokens` for batches of up to `max_batch` rows ("auto" reads
    this device's costs, measuring them first if they were never measured: `costs.load_costs`)."""
    if draft_model is None:
        return 0
    if num_draft_tokens == "auto":
        return Auto(load_costs(model, draft_model, batch_sizes(max_batch)))
    if num_draft_tokens == "heuristic":
        return Heuristic()
    return num_draft_tokens


# ---------------------------------------------------------------------------------------------
# One prompt


def stream_generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    draft_model: Drafter | None = None,
    num_draft_tokens: int | str = "auto",
    prompt_cache: PromptCache | None = None,
    **sampling,
) -> Iterator[Response]:
    """Generate from `model`, speculatively when `draft_model` is given: one `Response` per token.

    Greedy (temperature 0, the default) output is token for token what the target alone would
    produce; sampled output is distributed exactly as the target's own sampling, reproducibly
    for a given `seed` and draft-length schedule. Sampling keywords, as mlx-lm's
    `make_sampler` / `make_logits_processors` mean them: temperature, top_p, top_k, min_p,
    repetition_penalty, repetition_context_size, logits_processors (run on the logits, the
    repetition penalty first), seed (0..2**64-1; None: drawn from MLX's global generator).

    num_draft_tokens: an int 0..16 (fixed; 0 decodes plainly), "heuristic" (+2 after a fully
    accepted round, -1 otherwise) or "auto" (the k that maximises expected tokens per second,
    from costs measured once per device — `mlx-gemma-mtp calibrate` — and acceptance tracked
    as it goes; k = 0 when drafting does not pay).

    Generation stops after a stop id of the checkpoint (yielded with text "" and finish_reason
    "stop"), after `max_tokens`, or when the caller stops iterating. Bad arguments raise here,
    at the call. With `prompt_cache` (`make_prompt_cache`) only what the cache does not already
    hold is prefilled, and the cache is left holding the conversation for the next call, with
    its draft-length policy ("auto"'s acceptance and costs, learnt over the turns so far).
    """
    ids = encode_prompt(tokenizer, prompt)
    settings = sampling_from("stream_generate", sampling)
    check_draft_length(num_draft_tokens)
    request = Request(
        prompt=ids,
        max_tokens=max_tokens,
        sampling=settings,
        stop_ids=stop_ids(model, tokenizer),
        cache=prompt_cache,
    )
    check_request(model, request)
    if num_draft_tokens == 0:
        draft_model = None
    return _responses(model, tokenizer, draft_model, num_draft_tokens, request)


def _responses(model, tokenizer, draft_model, num_draft_tokens, request: Request) -> Iterator[Response]:
    """stream_generate's work, from its first iteration on ("auto" may measure this device's
    costs first, before the clock of the first response starts)."""
    clear_streams_at_thread_exit()  # this thread evaluates: it must free MLX's state before it ends
    policy = _conversation_policy(request.cache, num_draft_tokens, model, draft_model)
    engine = Engine(model, draft_model, num_draft_tokens=policy, max_batch=1)
    rid = engine.add(request)
    detokenizer = tokenizer.detokenizer
    mx.reset_peak_memory()
    start = time.perf_counter()
    first_at, yielded = None, 0
    try:
        for event in _events(engine):
            first_at = first_at or time.perf_counter()
            for response in _token_responses(event, detokenizer, start, first_at):
                yielded += 1  # counted before the yield: a stop there has received it
                yield response
    finally:
        engine.cancel(rid, keep=yielded)
        engine.close()  # the prompt cache holds what was yielded, now, not at garbage collection


def _conversation_policy(cache: PromptCache | None, num_draft_tokens, model, draft_model):
    """The draft-length policy of one call: a conversation's (`prompt_cache`) own, kept across
    its turns while the model, drafter and setting stay the same (auto's learnt acceptance and
    costs carry to the next turn: docs/auto.md, "Conversations in turn"); else a new one."""
    kept = cache.drafting if cache is not None else None
    if kept is not None and kept[0] is model and kept[1] is draft_model and kept[2] == num_draft_tokens:
        return kept[3]
    policy = draft_length(num_draft_tokens, model, draft_model)
    if cache is not None:
        cache.drafting = (model, draft_model, num_draft_tokens, policy)
    return policy


def _events(engine: Engine) -> Iterator[Event]:
    while engine.busy:
        yield from engine.step()


def _token_responses(event: Event, detokenizer, start: float, first_at: float) -> Iterator[Response]:
    usage = event.usage
    prompt = usage.prompt_tokens - usage.cached_tokens
    n = usage.generation_tokens - len(event.tokens)
    for i, (token, from_draft) in enumerate(zip(event.tokens, event.from_draft)):
        n += 1
        last = i == len(event.tokens) - 1
        finish = event.finish_reason if last else None
        if finish != "stop":
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        now = time.perf_counter()
        yield Response(
            text=detokenizer.last_segment,
            token=token,
            from_draft=from_draft,
            prompt_tokens=prompt,
            generation_tokens=n,
            drafted=usage.drafted,
            accepted=usage.accepted,
            prompt_tps=prompt / max(first_at - start, 1e-9),
            generation_tps=(n - 1) / (now - first_at) if now > first_at else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            acceptance_rate=usage.accepted / usage.drafted if usage.drafted else 0.0,
            mean_accepted=usage.accepted / usage.rounds if usage.rounds else 0.0,
            draft_lengths=usage.draft_lengths,
        )


def generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The generated text (stop ids excluded); arguments as `stream_generate`. verbose: print
    the text as it comes and a statistics line at the end, as mlx-lm's `generate` does."""
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        from .chat import stats_line  # chat imports this module

        print("\n" + "=" * 10 + "\n" + stats_line(last), file=sys.stdout, flush=True)
    return "".join(text)


# ---------------------------------------------------------------------------------------------
# Many prompts


@dataclass(frozen=True, kw_only=True)
class BatchChunk:
    """New output of one prompt (`index`, in prompt order), from `stream_batch_generate`."""

    index: int
    text: str
    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]
    finish_reason: str | None
    stats: Usage  # the prompt's totals so far


@dataclass(frozen=True, kw_only=True)
class BatchResponse:
    """`batch_generate`'s result, every list in prompt order."""

    texts: list[str]
    tokens: list[list[int]]  # a final stop id included, as stream_generate yields it
    finish_reasons: list[str]
    stats: list[Usage]  # each prompt's totals (acceptance_rate, mean_accepted, ...)
    total: Usage  # summed over the prompts
    generation_tps: float  # generated tokens (all rows) per second
    peak_memory: float  # GB


def stream_batch_generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[str | Sequence[int]],
    draft_model: Drafter | None = None,
    *,
    max_tokens: int | Sequence[int] = DEFAULT_MAX_TOKENS,
    num_draft_tokens: int | str = "auto",
    max_batch: int | None = None,
    **sampling,
) -> Iterator[BatchChunk]:
    """Generate from every prompt at once (one batch, `max_batch` rows at a time, default all):
    each prompt's output as it comes, one `BatchChunk` per prompt and round. Every row is what
    its prompt gives alone (greedy: token for token; sampled: in distribution). Keywords as
    `stream_generate`'s; `max_tokens` may be one per prompt; `seed` may be one per prompt (an
    int gives prompt i the seed `seed + i`). Bad input raises here, naming the prompt."""
    requests = _batch_requests(model, tokenizer, prompts, max_tokens, sampling)
    check_draft_length(num_draft_tokens)
    if num_draft_tokens == 0:
        draft_model = None
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    return _batch_chunks(
        model, tokenizer, draft_model, num_draft_tokens, requests, max_batch or len(requests)
    )


def _batch_requests(model, tokenizer, prompts, max_tokens, sampling: dict) -> list[Request]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings or token-id lists)")
    n = len(prompts)
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    seed = sampling.pop("seed", None)
    if seed is None or isinstance(seed, (int, float, str)):
        make_sampling(seed=seed)  # a bad one is named before prompts derive theirs from it
        seeds = [seed] * n if seed is None else [(seed + i) % SEED_LIMIT for i in range(n)]
    else:
        seeds = list(seed)
    if len(limits) != n or len(seeds) != n:
        raise ValueError(f"max_tokens and seed must be one value or one per prompt ({n} prompts)")
    requests = []
    for i, (prompt, limit, row_seed) in enumerate(zip(prompts, limits, seeds)):
        try:
            settings = sampling_from("batch_generate", dict(sampling, seed=row_seed))
            ids = encode_prompt(tokenizer, prompt)
            request = Request(
                prompt=ids, max_tokens=limit, sampling=settings, stop_ids=stop_ids(model, tokenizer)
            )
            check_request(model, request)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None
        requests.append(request)
    return requests


def _batch_chunks(
    model, tokenizer, draft_model, num_draft_tokens, requests, max_batch
) -> Iterator[BatchChunk]:
    clear_streams_at_thread_exit()  # this thread evaluates: it must free MLX's state before it ends
    policy = draft_length(num_draft_tokens, model, draft_model, max_batch)
    engine = Engine(model, draft_model, num_draft_tokens=policy, max_batch=max_batch)
    index = {engine.add(request): i for i, request in enumerate(requests)}
    detokenizers = {rid: tokenizer.detokenizer for rid in index}
    try:
        for event in _events(engine):
            detokenizer = detokenizers[event.rid]
            tokens = event.tokens[:-1] if event.finish_reason == "stop" else event.tokens
            for token in tokens:
                detokenizer.add_token(token)
            if event.finish_reason:
                detokenizer.finalize()
            yield BatchChunk(
                index=index[event.rid], text=detokenizer.last_segment if tokens or event.finish_reason else "",
                tokens=event.tokens, from_draft=event.from_draft, finish_reason=event.finish_reason,
                stats=event.usage,
            )  # fmt: skip
    finally:
        engine.close()


def batch_generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[str | Sequence[int]],
    draft_model: Drafter | None = None,
    **kwargs,
) -> BatchResponse:
    """Generate from every prompt at once; arguments as `stream_batch_generate`."""
    chunks = stream_batch_generate(model, tokenizer, prompts, draft_model, **kwargs)
    n = len(prompts)
    texts, tokens, finish, stats = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n, [None] * n
    mx.reset_peak_memory()
    start = time.perf_counter()
    for chunk in chunks:
        texts[chunk.index].append(chunk.text)
        tokens[chunk.index] += chunk.tokens
        finish[chunk.index], stats[chunk.index] = chunk.finish_reason, chunk.stats
    elapsed = time.perf_counter() - start
    total = Usage(
        **{f: sum(getattr(s, f) for s in stats) for f in Usage.__dataclass_fields__ if f != "draft_lengths"},
        draft_lengths=tuple(map(sum, zip(*(s.draft_lengths for s in stats)))),
    )
    return BatchResponse(
        texts=["".join(t) for t in texts], tokens=tokens, finish_reasons=finish, stats=stats, total=total,
        generation_tps=total.generation_tokens / elapsed, peak_memory=mx.get_peak_memory() / 1e9,
    )  # fmt: skip
