"""Gemma 4's chat format as an OpenAI-style server needs it: the messages the chat template
expects, and the model's output split into content, reasoning and tool calls.

The format (the chat template that ships with the checkpoints; `../shared/reference/gemma4/README.md`):
thinking is written as `<|channel>thought\\n ... <channel|>` before the answer; a tool call as
`<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings wrapped in `<|"|>`, keys bare, after
which the model stops on `<|tool_response>` and waits for the result. The template renders tool
results into the assistant turn that called the tool (`tool_responses`), so OpenAI's separate
`tool` messages are folded into the assistant message before them.

Output arrives as text chunks of any size (speculation emits several tokens per step): the
parsers here hold back a chunk's tail while it may still become a marker or a stop string, and
no longer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
CALL_START, CALL_END = "<|tool_call>", "<tool_call|>"
STRING_DELIMITER = '<|"|>'


def _partial_tail(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`: the
    text that must wait for the next chunk before it can be shown."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


class StopMatcher:
    """OpenAI's `stop`: the text ends before the first stop string, which is never shown.

    Matched across chunk boundaries; a chunk's tail is held back only while it is the start of
    some stop string."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """The part of the text so far that can be shown now; after a match, the text before it
        (and `matched` is True: nothing more is shown)."""
        if self.matched:
            return ""
        text = self._held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.matched, self._held = True, ""
            return text[: min(found)]
        keep = _partial_tail(text, self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the answer: what was held back (it never became a stop string)."""
        text, self._held = self._held, ""
        return text


# --------------------------------------------------------------------------------------------
# Tool calls


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


class _ArgumentReader:
    """Gemma's tool-call argument syntax, read into JSON values: `{key:value,...}` with bare
    keys, strings in `<|"|>`, lists in `[...]`, and bare numbers / true / false / null."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def fail(self, what: str):
        raise ValueError(f"{what} at character {self.at} of tool-call arguments {self.text!r}")

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.at):
            self.fail(f"expected {token!r}")
        self.at += len(token)

    def value(self):
        if self.text.startswith(STRING_DELIMITER, self.at):
            return self.string()
        if self.text.startswith("{", self.at):
            return self.mapping()
        if self.text.startswith("[", self.at):
            return self.sequence()
        end = self.at
        while end < len(self.text) and self.text[end] not in ",}]":
            end += 1
        raw, self.at = self.text[self.at : end].strip(), end
        if not raw:
            self.fail("missing value")
        try:
            return json.loads(raw)  # numbers, true, false, null
        except json.JSONDecodeError:
            return raw  # a bare word: the model meant a string

    def string(self) -> str:
        self.expect(STRING_DELIMITER)
        end = self.text.find(STRING_DELIMITER, self.at)
        if end < 0:
            self.fail("unterminated string")
        text, self.at = self.text[self.at : end], end + len(STRING_DELIMITER)
        return text

    def key(self) -> str:
        if self.text.startswith(STRING_DELIMITER, self.at):
            return self.string()
        end = self.text.find(":", self.at)
        if end < 0:
            self.fail("expected 'key:'")
        key, self.at = self.text[self.at : end].strip(), end
        return key

    def mapping(self) -> dict:
        self.expect("{")
        out = {}
        while not self.text.startswith("}", self.at):
            if out:
                self.expect(",")
            key = self.key()
            self.expect(":")
            out[key] = self.value()
        self.at += 1
        return out

    def sequence(self) -> list:
        self.expect("[")
        out = []
        while not self.text.startswith("]", self.at):
            if out:
                self.expect(",")
            out.append(self.value())
        self.at += 1
        return out


def parse_call(text: str) -> ToolCall:
    """`call:NAME{...}` (what stands between the tool-call markers) -> ToolCall; ValueError
    naming the problem otherwise."""
    text = text.strip()
    if not text.startswith("call:") or "{" not in text:
        raise ValueError(f"a tool call reads 'call:NAME{{...}}', got {text!r}")
    brace = text.index("{")
    name = text[len("call:") : brace].strip()
    if not name:
        raise ValueError(f"tool call without a name: {text!r}")
    reader = _ArgumentReader(text[brace:])
    arguments = reader.mapping()
    if reader.at != len(reader.text):
        reader.fail("unexpected text after the arguments")
    return ToolCall(name, arguments)


# --------------------------------------------------------------------------------------------
# The model's output


@dataclass
class Delta:
    """What one chunk of output added: answer text, thinking text, complete tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: Delta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls


class OutputParser:
    """Splits a chat answer, fed as text chunks, into content, reasoning and tool calls.

    States: "content"; "channel" (after `<|channel>`, its name up to the newline, not shown);
    "reasoning" (up to `<channel|>`); "call" (up to `<tool_call|>`, then parsed). A marker is
    never shown; a tool call that does not parse is shown as content, markers and all, rather
    than lost.
    """

    def __init__(self):
        self.state = "content"
        self._buffer = ""
        self.called = False  # a tool call was parsed (the answer's finish reason is "tool_calls")

    def feed(self, text: str) -> Delta:
        self._buffer += text
        delta = Delta()
        while self._step(delta):
            pass
        return delta

    def finish(self) -> Delta:
        """At the end of the answer: what was held back, in the state it was in."""
        delta, text, self._buffer = Delta(), self._buffer, ""
        if self.state == "call":
            delta.content = CALL_START + text  # cut off before its end marker: shown as it came
        elif self.state == "content":
            delta.content = text
        else:
            delta.reasoning = text
        self.state = "content"
        return delta

    def _step(self, delta: Delta) -> bool:
        """Consume the buffer up to the next state change; False when it must wait for more."""
        if self.state == "channel":
            return self._channel_name()
        if self.state == "call":
            at = self._buffer.find(CALL_END)
            if at < 0:
                return False
            self._call(delta, self._buffer[:at])
            self._buffer, self.state = self._buffer[at + len(CALL_END) :], "content"
            return True
        markers = (CHANNEL_START, CALL_START) if self.state == "content" else (CHANNEL_END,)
        found = [(i, m) for m in markers if (i := self._buffer.find(m)) >= 0]
        at, marker = min(found) if found else (len(self._buffer) - _partial_tail(self._buffer, markers), "")
        text, self._buffer = self._buffer[:at], self._buffer[at + len(marker) :]
        if self.state == "content":
            delta.content += text
        else:
            delta.reasoning += text
        if marker:
            self.state = {CHANNEL_START: "channel", CALL_START: "call", CHANNEL_END: "content"}[marker]
        return bool(marker)

    def _channel_name(self) -> bool:
        """Drop the channel's name ("thought") up to its newline; an empty channel ends at once."""
        newline, end = self._buffer.find("\n"), self._buffer.find(CHANNEL_END)
        if newline >= 0 and (end < 0 or newline < end):
            self._buffer, self.state = self._buffer[newline + 1 :], "reasoning"
        elif end >= 0:
            self._buffer, self.state = self._buffer[end + len(CHANNEL_END) :], "content"
        else:
            return False
        return True

    def _call(self, delta: Delta, text: str) -> None:
        try:
            delta.tool_calls.append(parse_call(text))
            self.called = True
        except ValueError:
            delta.content += CALL_START + text + CALL_END


# --------------------------------------------------------------------------------------------
# The messages the template renders


def _text(content, where: str) -> str | None:
    """A message's content as text: a string, or OpenAI's list of parts (text parts only)."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(
                f"{where}: content parts of type {part.get('type')!r} are not supported (text only)"
            )
        parts.append(part.get("text", ""))
    return "".join(parts)


def _arguments(call: dict, where: str) -> dict:
    """A tool call's arguments, sent by OpenAI clients as a JSON string, as the mapping the
    template writes in Gemma's syntax."""
    raw = call["function"].get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: arguments are not JSON ({e.msg})") from None
    if not isinstance(arguments, dict):  # the client's JSON, so a ValueError (a 400) like the rest
        raise ValueError(f"{where}: arguments must be a JSON object")
    return arguments


def _tool_result(content: str | None):
    """A tool's result as the template takes it: a JSON object as a mapping, anything else as text."""
    try:
        value = json.loads(content or "")
    except json.JSONDecodeError:
        return content or ""
    return value if isinstance(value, dict) else content


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI chat messages -> the messages Gemma 4's template renders.

    Roles system/developer/user/assistant keep their text; an assistant's `tool_calls` get their
    arguments as mappings; each `tool` message becomes a `tool_responses` entry of the assistant
    message whose call it answers, and an assistant message that only continues after the
    results (content, no calls) joins that same turn, as the model wrote it. ValueError names a
    message the format cannot hold.
    """
    out: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> the function it called
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role, text = message["role"], _text(message.get("content"), where)
        if role == "tool":
            _add_tool_result(out, names, message, text, where)
            continue
        if role == "assistant" and _continues(out, message):
            out[-1]["content"] = text or ""
            continue
        entry = {"role": role, "content": text}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = []
            for j, call in enumerate(message["tool_calls"]):
                name = call["function"]["name"]
                names[call.get("id") or f"#{j}"] = name
                arguments = _arguments(call, f"{where}.tool_calls[{j}]")
                entry["tool_calls"].append(
                    {"type": "function", "function": {"name": name, "arguments": arguments}}
                )
        elif text is None:
            raise ValueError(f"{where}: a {role} message needs content")
        out.append(entry)
    return out


def _continues(out: list[dict], message: dict) -> bool:
    """An assistant message that goes on after tool results (text only) belongs to their turn."""
    last = out[-1] if out else None
    return bool(
        last and last.get("tool_responses") and not last.get("content") and not message.get("tool_calls")
    )


def _add_tool_result(out: list[dict], names: dict[str, str], message: dict, text, where: str) -> None:
    caller = out[-1] if out else None
    if caller is None or caller["role"] != "assistant" or not caller.get("tool_calls"):
        raise ValueError(
            f"{where}: a tool message must follow the assistant message whose tool call it answers"
        )
    name = names.get(message.get("tool_call_id") or "") or message.get("name")
    if name is None:
        if len(caller["tool_calls"]) != 1:
            raise ValueError(f"{where}: tool_call_id {message.get('tool_call_id')!r} matches no tool call")
        name = caller["tool_calls"][0]["function"]["name"]
    caller.setdefault("tool_responses", []).append({"name": name, "response": _tool_result(text)})
