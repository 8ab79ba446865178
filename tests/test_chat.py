"""ChatSession as an app uses it: turns on a reused cache, cancellation, refusal of concurrent use."""

from __future__ import annotations

import threading

import pytest

from mlx_gemma_mtp import ChatSession, load, load_drafter, stream_generate
from mlx_gemma_mtp.chat import ChatBusyError
from mlx_gemma_mtp.target import Target

TURN = "<|turn>user\n{}<turn|>\n<|turn>model\n"  # the fixture template's user turn (Gemma 4 format)


@pytest.fixture(scope="module")
def pair(checkpoints):
    model, tokenizer = load(checkpoints["e2b"][0])
    return model, tokenizer, load_drafter(checkpoints["e2b"][1], model)


def _tokens(responses) -> list[int]:
    return [r.token for r in responses]


def _fresh(pair, ids: list[int], max_tokens: int) -> list[int]:
    """What the model answers to `ids` on an empty cache."""
    model, tokenizer, drafter = pair
    return _tokens(stream_generate(model, tokenizer, ids, max_tokens, draft_model=drafter))


def _added_ids(tokenizer, previous_answer, text: str) -> list[int]:
    """The ids a turn adds after an answer: the end of that turn (its stop id, when the model
    produced one, is already in the conversation) and the new user turn."""
    closing = "\n" if previous_answer[-1].finish_reason == "stop" else "<turn|>\n"
    return tokenizer.encode(closing + TURN.format(text), add_special_tokens=False)


def test_turns_reuse_the_cache(pair, monkeypatch):
    model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, drafter, max_tokens=60)
    text = "hello there"
    first = list(session.send(text))
    prompt = tokenizer.encode("<bos>" + TURN.format(text), add_special_tokens=False)
    assert first[0].prompt_tokens == len(prompt)
    assert session.tokens == prompt + _tokens(first)
    assert _tokens(first) == _fresh(pair, prompt, 60)

    # The conversation is kept as ids: a turn encodes only the text it adds, never an earlier
    # answer (whose text may re-encode to other ids, and the cache would re-prefill from there).
    encoded = []
    encode = tokenizer.encode
    monkeypatch.setattr(
        tokenizer._tokenizer, "encode", lambda text, **kw: encoded.append(text) or encode(text, **kw)
    )
    before = session.tokens
    second = list(session.send("and the water"))
    monkeypatch.undo()
    closing = "\n" if first[-1].finish_reason == "stop" else "<turn|>\n"
    assert encoded == [closing + TURN.format("and the water")]
    added = _added_ids(tokenizer, first, "and the water")
    assert session.tokens == before + added + _tokens(second)
    # Only the new turn is prefilled (plus the answer's last token, which the cache never holds).
    assert second[0].prompt_tokens == len(added) + 1
    assert _tokens(second) == _fresh(pair, before + added, 60)

    answers = [tokenizer.decode([t for t in _tokens(a) if t not in (1, 106)]) for a in (first, second)]
    assert session.history == [
        {"role": "user", "content": text},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "and the water"},
        {"role": "assistant", "content": answers[1]},
    ]
    assert session.last == second[-1]


def test_break_keeps_the_answer_so_far_and_reset_starts_over(pair):
    model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, drafter, system="be brief", max_tokens=200)
    shown = []
    for r in session.send("tell me a long story about the water"):
        shown.append(r)
        if len(shown) == 5:
            break
    assert session.last == shown[-1] and session.last.finish_reason is None
    assert session.history[-1] == {"role": "assistant", "content": tokenizer.decode(_tokens(shown))}
    before = session.tokens
    added = _added_ids(tokenizer, shown, "go on")
    answer = list(session.send("go on"))
    assert answer[0].prompt_tokens == len(added) + 1
    assert _tokens(answer)[:20] == _fresh(pair, before + added, 20)[: len(answer)]

    session.reset()
    assert session.history == [{"role": "system", "content": "be brief"}] and session.tokens == []
    again = list(session.send("go on"))
    assert again[0].prompt_tokens == len(
        tokenizer.encode(
            "<bos><|turn>system\nbe brief<turn|>\n" + TURN.format("go on"), add_special_tokens=False
        )
    )


def test_cancel_from_another_thread(checkpoints):
    """As an app does it: load on the main thread, stream on a worker, stop from the main thread."""
    model, tokenizer = load(checkpoints["e2b"][0])
    drafter = load_drafter(checkpoints["e2b"][1], model)
    pair = model, tokenizer, drafter
    session = ChatSession(model, tokenizer, drafter, max_tokens=2000, num_draft_tokens=3)
    seen, at_cancel, errors = [], [], []
    ten = threading.Event()

    def worker():
        try:
            for r in session.send("tell me a long story about the water"):
                seen.append(r)
                if len(seen) == 10:
                    ten.set()
        except Exception as e:
            errors.append(e)
        finally:
            ten.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert ten.wait(timeout=60)
    session.cancel()
    at_cancel.append(len(seen))
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors
    assert at_cancel[0] >= 10, "the answer ended before 10 tokens: pick another prompt"
    # The stream ends within the round being computed: at most k + 1 tokens after cancel().
    assert len(seen) - at_cancel[0] <= 4
    assert session.last == seen[-1] and seen[-1].finish_reason is None
    assert session.tokens[-len(seen) :] == _tokens(seen)

    # The session goes on from what was shown, on a consistent cache.
    before = session.tokens
    added = _added_ids(tokenizer, seen, "why")
    answer = list(session.send("why"))
    assert answer[0].prompt_tokens == len(added) + 1
    assert _tokens(answer)[:30] == _fresh(pair, before + added, 30)[: len(answer)]


def test_concurrent_answers_on_one_model_are_refused(pair, checkpoints):
    model, tokenizer, drafter = pair
    one = ChatSession(model, tokenizer, drafter, max_tokens=50)
    two = ChatSession(model, tokenizer, drafter, max_tokens=50)
    stream = one.send("hello")
    next(stream)
    with pytest.raises(ChatBusyError, match="already streaming"):
        next(two.send("hi"))
    with pytest.raises(ChatBusyError, match="already streaming"):
        next(one.send("hi"))
    with pytest.raises(ChatBusyError, match="cannot reset"):
        one.reset()
    refused = []

    def other_thread():
        try:
            next(two.send("hi"))
        except ChatBusyError as e:
            refused.append(e)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert refused
    # Another model is not held up.
    other_model, other_tokenizer = load(checkpoints["dense"][0])
    assert list(ChatSession(other_model, other_tokenizer, max_tokens=3).send("hi"))
    stream.close()
    assert list(two.send("hi")) and list(one.send("hi"))


def test_interrupt_inside_a_forward_rebuilds_the_cache(pair, monkeypatch):
    """A KeyboardInterrupt (a second Ctrl-C) can land mid-forward: the session keeps the answer so
    far and prefills the whole conversation again on a fresh cache."""
    model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, drafter, max_tokens=200)
    calls = 0
    forward = Target.__call__

    def interrupted_forward(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 6:  # prefill, then verify rounds
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Target, "__call__", interrupted_forward)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        seen.extend(session.send("tell me a long story about the water"))  # keeps what came before
    monkeypatch.undo()
    assert seen and session.last == seen[-1] and seen[-1].finish_reason is None
    before = session.tokens
    added = _added_ids(tokenizer, seen, "why")
    answer = list(session.send("why"))
    assert answer[0].prompt_tokens == len(before + added)
    assert _tokens(answer)[:30] == _fresh(pair, before + added, 30)[: len(answer)]


def test_bad_arguments_raise_at_construction(pair, monkeypatch):
    model, tokenizer, drafter = pair
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ChatSession(model, tokenizer, drafter, num_draft_tokens=99)
    with pytest.raises(ValueError, match="max_tokens"):
        ChatSession(model, tokenizer, drafter, max_tokens=0)
    with pytest.raises(ValueError, match="message is empty"):
        next(ChatSession(model, tokenizer, drafter).send("  "))
    monkeypatch.setattr(tokenizer._tokenizer, "has_chat_template", False)
    with pytest.raises(ValueError, match="no chat template"):
        ChatSession(model, tokenizer, drafter)
