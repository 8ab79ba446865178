"""A conversation an app (or the `chat` command) can hold: history, prompt cache, streaming answers.

The conversation is kept as the token ids the model saw and produced, not re-rendered from text
each turn: an answer's text need not re-encode to the ids that produced it, and the prompt cache
would then re-prefill from the first difference. Each turn encodes only what the chat template adds after the
conversation so far, so a turn prefills its own tokens (and the previous answer's last token,
which the cache does not hold yet).

Threads: `cancel()` may be called from any thread. One answer at a time per model: a `send` on
a session (this one or another) whose model is already streaming an answer raises
`ChatBusyError`; nothing is queued.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .drafter import Drafter
from .engine import ContextError
from .generate import DEFAULT_MAX_TOKENS, Response, check_arguments, make_prompt_cache, stream_generate
from .target import Target


class ChatBusyError(RuntimeError):
    """The model is already streaming an answer (for this session or another)."""


# One lock per model object (keyed by id: an nn.Module is a dict, not hashable). A lock left
# behind by a model that has been freed is released, so a new model reusing its id is unaffected.
_model_locks: dict[int, threading.Lock] = {}
_model_locks_guard = threading.Lock()


def _model_lock(model: Target) -> threading.Lock:
    with _model_locks_guard:
        return _model_locks.setdefault(id(model), threading.Lock())


# Drafts seen without one accepted before a pair is called foreign: an agreeing drafter keeps
# more than half of them, so none of this many is no accident.
FOREIGN_AFTER = 32


def drafter_warning(drafted: int, accepted: int, drafter: Drafter | None) -> str | None:
    """A warning when `drafter` keeps agreeing on nothing with its target, else None."""
    if drafter is None or drafted < FOREIGN_AFTER or accepted:
        return None
    return (
        f"warning: none of {drafted} drafts of the drafter {drafter.source} was accepted: it may not be "
        "this target's drafter (--draft-model names another, --no-draft decodes without one)"
    )


def stats_line(last: Response) -> str:
    """One line of statistics from a stream's last response (which carries its totals), as
    `generate` prints it to stderr and `chat` shows it for /stats."""
    parts = [
        f"prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s",
        f"generation {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s",
    ]
    rounds = {k: n for k, n in enumerate(last.draft_lengths) if n}
    if last.drafted:
        mean_k = sum(k * n for k, n in rounds.items()) / sum(rounds.values())
        chosen = ", ".join(f"{n} at k={k}" for k, n in sorted(rounds.items(), key=lambda kn: -kn[1]))
        parts += [
            f"acceptance {last.acceptance_rate:.0%} ({last.accepted}/{last.drafted})",
            f"mean accepted length {last.mean_accepted:.2f}",
            f"chosen k {mean_k:.1f} (rounds: {chosen})",
        ]
        if last.drafted >= FOREIGN_AFTER and not last.accepted:
            parts.append("no draft accepted: the drafter may not be this target's")
    else:
        parts.append("no drafting")
    memory = last.peak_memory
    parts.append(f"peak memory {memory:.2f} GB" if memory >= 1 else f"peak memory {memory * 1e3:.0f} MB")
    return " | ".join(parts)


class ChatSession:
    """A multi-turn conversation with a Gemma 4 target (and its drafter) on the model's chat
    template, keeping the prompt cache between turns.

        session = ChatSession(model, tokenizer, drafter, system="Be brief.")
        for r in session.send("Why is the sky blue?"):
            print(r.text, end="", flush=True)

    `generate_kwargs` (`num_draft_tokens`, sampling parameters) go to `stream_generate` on every
    turn; bad values raise here.
    """

    def __init__(
        self,
        model: Target,
        tokenizer: TokenizerWrapper,
        draft_model: Drafter | None = None,
        *,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        **generate_kwargs,
    ):
        if not tokenizer.has_chat_template:
            raise ValueError("the tokenizer has no chat template: a chat needs one")
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.system = system
        self.max_tokens = max_tokens
        self.generate_kwargs = generate_kwargs
        check_arguments("ChatSession", max_tokens, generate_kwargs)
        self._lock = _model_lock(model)
        self._cancel = threading.Event()  # the streaming answer's; a fresh one per answer
        self._streaming = False
        # The last answer's last response: its statistics are the answer's totals, and its
        # finish_reason is None when the answer was cancelled or the caller stopped early (None:
        # no answer yet, or the last was cancelled before its first token).
        self.last: Response | None = None
        self.drafted = self.accepted = 0  # drafts over the session, for `drafter_warning`
        self._warned = False
        self.reset()

    @property
    def history(self) -> list[dict]:
        """The messages so far ({"role", "content"}), the system message first if any."""
        return list(self._history)

    @property
    def tokens(self) -> list[int]:
        """The conversation's token ids as the model saw and produced them (its context)."""
        return list(self._ids)

    @property
    def full(self) -> bool:
        """Whether the conversation has reached the model's context."""
        return len(self._ids) >= self.model.args.max_position_embeddings - 1

    def drafter_warning(self) -> str | None:
        """A warning, once per session, when the drafter has agreed on nothing so far."""
        warning = None if self._warned else drafter_warning(self.drafted, self.accepted, self.draft_model)
        self._warned = self._warned or warning is not None
        return warning

    def reset(self) -> None:
        """Start a new conversation (same system message), with an empty prompt cache."""
        if self._streaming:
            raise ChatBusyError("cannot reset while an answer is streaming; cancel() it first")
        self._history = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: list[int] = []  # the conversation's token ids, as the model saw and produced them
        self._rendered = ""  # the text those ids stand for
        self._cache = make_prompt_cache(self.model)

    def cancel(self) -> None:
        """Stop the answer of the last `send` (from any thread): the stream ends after the token
        being computed, within one round, or before its first token if it has not started;
        the message and the answer so far stay in the conversation."""
        self._cancel.set()

    def send(self, text: str) -> Iterator[Response]:
        """Add a user message and stream the model's answer, one `Response` per token.

        The answer ends at a stop id, after `max_tokens`, where the model's context ends, on
        `cancel()` (from the moment `send` returns), or when the caller stops iterating; in
        every case the message and the answer so far (possibly empty) join the history and the
        cache stays ready for the next turn. Errors leave the conversation as it was: an empty
        message or this session already streaming raise here; another session's answer on the
        same model (`ChatBusyError`) and a conversation too long for the model's context
        (`ContextError`: `reset()` starts a new one) raise when iteration starts.
        """
        if not text.strip():
            raise ValueError("message is empty")
        if self._streaming:
            raise ChatBusyError(
                "this session is already streaming an answer; finish, close or cancel() it first"
            )
        self._cancel = cancel = threading.Event()  # cancel() from here on stops this answer
        return self._stream(text, cancel)

    def _stream(self, text: str, cancel: threading.Event) -> Iterator[Response]:
        if not self._lock.acquire(blocking=False):
            raise ChatBusyError(
                "the model is already streaming an answer; finish, close or cancel() it first "
                "(one answer at a time per model)"
            )
        try:
            self._streaming = True
            yield from self._answer(text, cancel)
        finally:
            self._streaming = False
            self._lock.release()

    def _prompt(self, text: str) -> tuple[list[int], str]:
        """The token ids of the conversation plus the new user turn, and the text they stand for."""
        messages = self._history + [{"role": "user", "content": text}]
        full = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self._ids and full.startswith(self._rendered):
            added = self.tokenizer.encode(full[len(self._rendered) :], add_special_tokens=False)
            return self._ids + added, full
        # First turn, or a template that rewrites earlier turns: encode it all (the prompt cache
        # still reuses the longest prefix it shares).
        return self.tokenizer.encode(full, add_special_tokens=False), full

    def _answer(self, text: str, cancel: threading.Event) -> Iterator[Response]:
        prompt_ids, rendered = self._prompt(text)
        context = self.model.args.max_position_embeddings
        if len(prompt_ids) >= context:
            raise ContextError(
                f"the conversation is full: with this message it holds {len(prompt_ids)} tokens, the "
                f"model's context {context}; /reset (ChatSession.reset) starts a new one"
            )
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt_ids,
            self.max_tokens,
            draft_model=self.draft_model,
            prompt_cache=self._cache,
            **self.generate_kwargs,
        )
        seen: list[Response] = []
        computing = False
        try:
            while not cancel.is_set():
                computing = True
                r = next(responses, None)
                computing = False
                if r is None:
                    break
                seen.append(r)
                yield r
        finally:
            responses.close()  # settles the cache
            if computing:  # interrupted inside a forward (KeyboardInterrupt, an error): start afresh
                self._cache = make_prompt_cache(self.model)
            self._record(text, prompt_ids, rendered, seen)

    def _record(self, text: str, prompt_ids: list[int], rendered: str, seen: list[Response]) -> None:
        generated = [r.token for r in seen]
        finished = seen[-1].finish_reason if seen else None
        answer = generated[:-1] if finished == "stop" else generated
        self._history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": self.tokenizer.decode(answer)},
        ]
        self._ids = prompt_ids + generated
        self._rendered = rendered + self.tokenizer.decode(generated)
        self.last = seen[-1] if seen else None
        if seen:
            self.drafted += seen[-1].drafted
            self.accepted += seen[-1].accepted
