"""Gemma 4's output parsing and the stop-string matcher, fed in every possible chunking."""

from __future__ import annotations

import pytest

from mlx_gemma_mtp.chat_format import (
    CALL_END,
    CALL_START,
    CHANNEL_END,
    CHANNEL_START,
    Delta,
    OutputParser,
    StopMatcher,
    ToolCall,
    parse_call,
    template_messages,
)

Q = '<|"|>'
ANSWER = (
    f"{CHANNEL_START}thought\nThe user wants <b>weather</b>; call it.{CHANNEL_END}Let me check."
    f"{CALL_START}call:get_weather{{city:{Q}Paris, {{FR}}{Q},days:3,units:[{Q}C{Q},kelvin],"
    f"opts:{{exact:true,note:null,ratio:-1.5e2}}}}{CALL_END}"
)
EXPECTED_CALL = ToolCall(
    "get_weather",
    {
        "city": "Paris, {FR}",
        "days": 3,
        "units": ["C", "kelvin"],
        "opts": {"exact": True, "note": None, "ratio": -150.0},
    },
)
MARKERS = (CHANNEL_START, CHANNEL_END, CALL_START, CALL_END)


def _parse(chunks: list[str], clean: bool = True) -> tuple[Delta, bool]:
    parser, total = OutputParser(), Delta()
    for chunk in chunks:
        delta = parser.feed(chunk)
        assert not clean or not any(m in delta.content or m in delta.reasoning for m in MARKERS), delta
        total.add(delta)
    total.add(parser.finish())
    return total, parser.called


@pytest.mark.parametrize("cut_size", [1, 2, 3, 5, 7, 11])
def test_every_chunking_parses_alike(cut_size):
    # Each split point is tried by some chunk size; markers never reach content or reasoning.
    for offset in range(cut_size):
        chunks = [ANSWER[:offset]] + [ANSWER[i : i + cut_size] for i in range(offset, len(ANSWER), cut_size)]
        total, called = _parse(chunks)
        assert total.reasoning == "The user wants <b>weather</b>; call it."
        assert total.content == "Let me check."
        assert total.tool_calls == [EXPECTED_CALL] and called


def test_content_is_released_as_soon_as_no_marker_can_start():
    parser = OutputParser()
    assert parser.feed("a < b and c <|ch").content == "a < b and c "  # "<|ch" may begin <|channel>
    assert parser.feed("ess").content == "<|chess"
    assert parser.feed("<").content == ""
    assert parser.finish().content == "<"  # the end: a held tail is text after all


def test_unclosed_or_malformed_calls_stay_visible():
    broken = f"ok {CALL_START}call:f{{a:{Q}x}}{CALL_END} after"
    total, called = _parse([broken], clean=False)
    assert total.content == broken and not called
    cut = f"{CALL_START}call:f{{a:1"
    total, called = _parse([cut], clean=False)
    assert total.content == cut and not called
    total, _ = _parse([f"{CHANNEL_START}thought{CHANNEL_END}answer"])  # an empty channel
    assert (total.reasoning, total.content) == ("", "answer")


@pytest.mark.parametrize(
    "text", ["call:f", "call:{a:1}", "call:f{a}", "call:f{a:1", "call:f{a:1}}", f"call:f{{a:{Q}x}}"]
)
def test_parse_call_refuses_malformed(text):
    with pytest.raises(ValueError):
        parse_call(text)


def test_stop_strings_across_chunks():
    text = "one two THE END three"
    for size in range(1, len(text) + 1):
        matcher, shown = StopMatcher(["END", "xyz", "two T"]), ""
        for i in range(0, len(text), size):
            shown += matcher.feed(text[i : i + size])
        assert matcher.matched and shown == "one "
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc EN") == "abc " and matcher.feed("Xy") == "ENXy"  # held only while it may match
    assert matcher.feed("E") == "" and matcher.flush() == "E" and not matcher.matched
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_template_messages_fold_tool_results_into_the_calling_turn():
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": " in Paris?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]
    assert template_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "21 degrees.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
            "tool_responses": [{"name": "get_weather", "response": {"temp": 21}}],
        },
        {"role": "user", "content": "Thanks"},
    ]
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    with pytest.raises(ValueError, match=r"messages\[1\]: a tool message must follow"):
        template_messages(orphan)
    bad_args = [
        {"role": "assistant", "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}]}
    ]
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls\[0\]: arguments are not JSON"):
        template_messages(bad_args)
    with pytest.raises(ValueError, match="image_url"):
        template_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
