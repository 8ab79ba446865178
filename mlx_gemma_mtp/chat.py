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
from .generate import Response, check_arguments, make_prompt_cache, stream_generate
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
        max_tokens: int = 512,
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
        # finish_reason is None when the answer was cancelled or the caller stopped early.
        self.last: Response | None = None
        self.reset()

    @property
    def history(self) -> list[dict]:
        """The messages so far ({"role", "content"}), the system message first if any."""
        return list(self._history)

    @property
    def tokens(self) -> list[int]:
        """The conversation's token ids as the model saw and produced them (its context)."""
        return list(self._ids)

    def reset(self) -> None:
        """Start a new conversation (same system message), with an empty prompt cache."""
        if self._streaming:
            raise ChatBusyError("cannot reset while an answer is streaming; cancel() it first")
        self._history = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: list[int] = []  # the conversation's token ids, as the model saw and produced them
        self._rendered = ""  # the text those ids stand for
        self._cache = make_prompt_cache(self.model)

    def cancel(self) -> None:
        """Stop the answer being streamed (from any thread): the stream ends after the token being
        computed, within one round; the answer so far stays in the conversation. No-op when no
        answer is streaming (a `send` not yet iterated has not started)."""
        self._cancel.set()

    def send(self, text: str) -> Iterator[Response]:
        """Add a user message and stream the model's answer, one `Response` per token.

        The answer ends at a stop id, after `max_tokens`, on `cancel()`, or when the caller stops
        iterating; in every case it joins the history and the cache stays ready for the next
        turn. Errors (an empty message, `ChatBusyError`) raise when iteration starts.
        """
        if not text.strip():
            raise ValueError("message is empty")
        if not self._lock.acquire(blocking=False):
            raise ChatBusyError(
                "the model is already streaming an answer; finish, close or cancel() it first "
                "(one answer at a time per model)"
            )
        try:
            self._streaming = True
            self._cancel = cancel = threading.Event()  # cancel() from here on stops this answer
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
            if seen:
                self._record(text, prompt_ids, rendered, seen)

    def _record(self, text: str, prompt_ids: list[int], rendered: str, seen: list[Response]) -> None:
        generated = [r.token for r in seen]
        finished = seen[-1].finish_reason
        answer = generated[:-1] if finished == "stop" else generated
        self._history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": self.tokenizer.decode(answer)},
        ]
        self._ids = prompt_ids + generated
        self._rendered = rendered + self.tokenizer.decode(generated)
        self.last = seen[-1]
