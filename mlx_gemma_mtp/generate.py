"""Text in, text out: `stream_generate` wraps the token generators into responses."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .drafter import Drafter
from .cache import CacheRewindError
from .speculative import (
    MAX_DRAFT,
    DraftStats,
    drafter_proposer,
    plain_tokens,
    rewind,
    speculative_tokens,
)
from .target import Target


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
    if not isinstance(num_draft_tokens, int) or not 0 <= num_draft_tokens <= MAX_DRAFT:
        raise ValueError(f"num_draft_tokens must be an int in 0..{MAX_DRAFT}, got {num_draft_tokens!r}")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")


def stream_generate(
    model: Target,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    draft_model: Drafter | None = None,
    max_tokens: int = 256,
    num_draft_tokens: int = 3,
    *,
    prompt_cache: PromptCache | None = None,
) -> Iterator[Response]:
    """Generate greedily from `model`, speculatively when `draft_model` is given.

    Output is token-for-token what the target alone would produce. Generation stops after a
    stop id of the checkpoint (yielded with text "" and finish_reason "stop"), after
    `max_tokens`, or when the caller stops iterating. Bad arguments raise here, at the call.
    With `prompt_cache` (from `make_prompt_cache`) only the part of the prompt that the cache
    does not already hold is prefilled, and the cache is kept for the next call.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    _check_arguments(model, prompt_ids, max_tokens, num_draft_tokens)
    prompt_cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    new_ids = _reuse(model, prompt_cache, prompt_ids)
    cache = prompt_cache.cache
    new_array = mx.array([new_ids], dtype=mx.int32)
    stats = DraftStats()
    if draft_model is not None and num_draft_tokens > 0:
        propose = drafter_proposer(draft_model, model)
        tokens = speculative_tokens(model, new_array, cache, propose, num_draft_tokens, max_tokens, stats)
    else:
        tokens = plain_tokens(model, new_array, cache)
    tokens = _recorded(tokens, prompt_cache, new_ids)
    stop_ids = set(tokenizer.eos_token_ids) | set(model.config.stop_ids)
    return stream_tokens(tokens, tokenizer, stop_ids, len(new_ids), max_tokens, stats)


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
    num_draft_tokens: int = 3,
) -> str:
    """The generated text (stop ids excluded); arguments as `stream_generate`."""
    return "".join(
        r.text for r in stream_generate(model, tokenizer, prompt, draft_model, max_tokens, num_draft_tokens)
    )
