"""Text in, text out: `stream_generate` wraps the token generators into responses."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import CacheRewindError
from .costs import load_costs
from .draft_length import MAX_DRAFT, Auto, DraftLength, Heuristic
from .drafter import Drafter
from .sample import LogitsProcessor, make_sampling, random_key
from .speculative import DraftStats, drafter_proposer, plain_tokens, rewind, speculative_tokens
from .target import Target
from .threads import clear_streams_at_thread_exit

DRAFT_SCHEDULES = ("auto", "heuristic")


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
    draft_lengths: tuple[int, ...]  # rounds per drafted length k = 0..MAX_DRAFT (k = 0: a plain token)


@dataclass
class PromptCache:
    """A conversation's target cache and the token ids whose K/V it holds, for reuse across
    calls: a prompt that extends `tokens` only prefills what is new."""

    cache: list
    tokens: list[int] = field(default_factory=list)


def make_prompt_cache(model: Target) -> PromptCache:
    return PromptCache(cache=model.make_cache(room=MAX_DRAFT + 1))


def _reuse(model: Target, prompt_cache: PromptCache, prompt_ids: list[int]) -> list[int]:
    """Rewind `prompt_cache` to its longest prefix shared with the prompt; the ids still to run."""
    held = prompt_cache.tokens
    common = 0
    limit = min(len(held), len(prompt_ids) - 1)  # at least one token must run to get logits
    while common < limit and held[common] == prompt_ids[common]:
        common += 1
    try:
        rewind(prompt_cache.cache, len(held) - common)
    except CacheRewindError:  # the sliding window no longer holds that far back: start afresh
        prompt_cache.cache = model.make_cache(room=MAX_DRAFT + 1)
        common = 0
    prompt_cache.tokens = held[:common]
    return prompt_ids[common:]


def _recorded(tokens: Iterator[tuple[int, bool]], prompt_cache: PromptCache, prompt_ids: list[int]):
    """Pass tokens through; on close, record which ids the settled cache holds."""
    generated = []
    try:
        for item in tokens:
            generated.append(item[0])
            yield item
    finally:
        tokens.close()
        held = prompt_cache.cache[0].offset
        prompt_cache.tokens = (prompt_cache.tokens + prompt_ids + generated)[:held]


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str | list[int]) -> list[int]:
    if len(prompt) == 0:
        raise ValueError("prompt is empty: nothing to continue from")
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        ids = tokenizer.encode(prompt, add_special_tokens=add_special)
    else:
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("prompt must be a str or a list of int token ids")
    return ids


def _check_arguments(model: Target, prompt_ids: list[int], max_tokens, num_draft_tokens) -> None:
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    fixed = isinstance(num_draft_tokens, int) and not isinstance(num_draft_tokens, bool)
    if not (fixed and 0 <= num_draft_tokens <= MAX_DRAFT or num_draft_tokens in DRAFT_SCHEDULES):
        raise ValueError(
            f"num_draft_tokens must be an int in 0..{MAX_DRAFT}, 'heuristic' or 'auto', "
            f"got {num_draft_tokens!r}"
        )
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")


def draft_length(num_draft_tokens: int | str, model: Target, draft_model: Drafter) -> int | DraftLength:
    """The policy behind `num_draft_tokens` ("auto" reads or measures this device's costs)."""
    if num_draft_tokens == "auto":
        return Auto(load_costs(model, draft_model))
    if num_draft_tokens == "heuristic":
        return Heuristic()
    return num_draft_tokens


def stream_generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    draft_model: Drafter | None = None,
    max_tokens: int = 256,
    num_draft_tokens: int | str = "auto",
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logits_processors: list[LogitsProcessor] | None = None,
    seed: int | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[Response]:
    """Generate from `model`, speculatively when `draft_model` is given.

    Greedy (temperature 0, the default) output is token-for-token what the target alone would
    produce; sampled output is distributed exactly as the target's own sampling (speculative
    sampling), reproducibly for a given `seed` and draft-length schedule. temperature, top_p,
    top_k, min_p, repetition_penalty, repetition_context_size and logits_processors mean what
    they mean in mlx-lm's `make_sampler` / `make_logits_processors` (processors run on the
    logits: the repetition penalty first, then `logits_processors`).

    num_draft_tokens: an int 0..16 (fixed; 0 decodes plainly), "heuristic" (+2 after a fully
    accepted round, -1 otherwise) or "auto" (the k that maximises expected tokens per second,
    from costs measured once per device and acceptance tracked as it goes; k = 0 when drafting
    does not pay). Each response carries the drafting statistics so far.

    Generation stops after a stop id of the checkpoint (yielded with text "" and finish_reason
    "stop"), after `max_tokens`, or when the caller stops iterating. Bad arguments raise here,
    at the call. With `prompt_cache` (from `make_prompt_cache`) only the part of the prompt that
    the cache does not already hold is prefilled, and the cache is kept for the next call.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    _check_arguments(model, prompt_ids, max_tokens, num_draft_tokens)
    sampling = make_sampling(
        temperature, top_p, top_k, min_p, repetition_penalty, repetition_context_size, logits_processors
    )
    key = None if sampling.greedy else random_key(seed)
    prompt_cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    new_ids = _reuse(model, prompt_cache, prompt_ids)
    if num_draft_tokens == 0:
        draft_model = None
    return _responses(
        model, tokenizer, draft_model, num_draft_tokens, prompt_cache, prompt_ids, new_ids, max_tokens,
        sampling, key,
    )  # fmt: skip


def _responses(
    model, tokenizer, draft_model, num_draft_tokens, prompt_cache, prompt_ids, new_ids, max_tokens,
    sampling, key,
):  # fmt: skip
    """stream_generate's work, from its first iteration on ("auto" measures this device's costs
    at first use, before the clock of the first response starts)."""
    clear_streams_at_thread_exit()  # this thread evaluates: it must free MLX's state before it ends
    prompt = mx.array([new_ids], dtype=mx.int32)
    context = prompt_ids[: len(prompt_ids) - len(new_ids)]  # already in the cache
    cache = prompt_cache.cache
    stats = DraftStats()
    if draft_model is None:
        tokens = plain_tokens(model, prompt, cache, sampling=sampling, key=key, context=context, stats=stats)
    else:
        policy = draft_length(num_draft_tokens, model, draft_model)
        propose = drafter_proposer(draft_model, model)
        tokens = speculative_tokens(
            model, prompt, cache, propose, policy, max_tokens, stats,
            sampling=sampling, key=key, context=context,
        )  # fmt: skip
    tokens = _recorded(tokens, prompt_cache, new_ids)
    stop_ids = set(tokenizer.eos_token_ids) | set(model.config.stop_ids)
    yield from stream_tokens(tokens, tokenizer, stop_ids, len(new_ids), max_tokens, stats)


def stream_tokens(
    tokens: Iterator[tuple[int, bool]],
    tokenizer: TokenizerWrapper,
    stop_ids: set[int],
    prompt_tokens: int,
    max_tokens: int,
    stats: DraftStats,
) -> Iterator[Response]:
    """Responses from a token generator (`speculative.py`), stopping at a stop id or after
    `max_tokens`; closing the token generator settles its cache."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = generation_start = 0.0
    try:
        for n, (token, from_draft) in enumerate(tokens, start=1):
            now = time.perf_counter()
            if n == 1:
                prompt_tps = prompt_tokens / (now - start)
                generation_start = now
            finish = "stop" if token in stop_ids else "length" if n == max_tokens else None
            if token not in stop_ids:
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
            elapsed = now - generation_start
            yield Response(
                text=detokenizer.last_segment,
                token=token,
                from_draft=from_draft,
                prompt_tokens=prompt_tokens,
                generation_tokens=n,
                drafted=stats.drafted,
                accepted=stats.accepted,
                prompt_tps=prompt_tps,
                generation_tps=(n - 1) / elapsed if elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                acceptance_rate=stats.acceptance_rate,
                mean_accepted=stats.mean_accepted,
                draft_lengths=tuple(stats.k_histogram),
            )
            if finish:
                break
    finally:
        tokens.close()  # settles the cache now, not at garbage collection


def generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    draft_model: Drafter | None = None,
    max_tokens: int = 256,
    num_draft_tokens: int | str = "auto",
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logits_processors: list[LogitsProcessor] | None = None,
    seed: int | None = None,
    prompt_cache: PromptCache | None = None,
) -> str:
    """The generated text (stop ids excluded); arguments as `stream_generate`."""
    responses = stream_generate(
        model, tokenizer, prompt, draft_model, max_tokens, num_draft_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        logits_processors=logits_processors, seed=seed, prompt_cache=prompt_cache,
    )  # fmt: skip
    return "".join(r.text for r in responses)
