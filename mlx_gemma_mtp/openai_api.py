"""OpenAI's API shapes: the requests the server accepts (validated) and the answers it sends.

Requests are pydantic models in strict mode (a string where a number belongs is a 400, not a
guess); fields OpenAI defines that this server cannot honour (n > 1, penalties, logit_bias, echo,
...) are refused by name rather than ignored. `Answer` turns one row's Events into OpenAI's
response, chunk by chunk or whole. The reference is OpenAI's API as the `openai` client package
(3.x) types it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .chat_format import Delta, OutputParser, StopMatcher, ToolCall

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str | dict = "{}"


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """The fields /v1/chat/completions and /v1/completions share."""

    model: str | None = None  # accepted and ignored: the server serves one model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extra: not OpenAI's
    min_p: float | None = Field(None, ge=0, le=1)  # extra
    repetition_penalty: float | None = Field(None, gt=0)  # extra
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"must be 1 (one answer per request), got {n}")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("not supported (repetition_penalty is)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"must be up to {MAX_STOP_STRINGS} non-empty strings")
        return stop

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": true}
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree (give one)")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """The engine's `logprobs`: None, or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int = 1

    @model_validator(mode="after")
    def _completion_supported(self):
        several = isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str)
        if several:
            raise ValueError("prompt: one prompt per request (a string or a list of token ids)")
        if self.echo or self.suffix is not None or self.best_of != 1:
            raise ValueError("echo, suffix and best_of are not supported")
        return self

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


# --------------------------------------------------------------------------------------------
# Answers


class Pieces:
    """Token ids as logprobs show them: (text, UTF-8 bytes), cached per id."""

    _BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer):
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if byte := self._BYTE.fullmatch(piece or ""):  # SentencePiece's byte fallback
                raw = bytes([int(byte.group(1), 16)])
                self._cache[token] = (raw.decode("utf-8", "replace"), list(raw))
            else:
                text = self.tokenizer.decode([token])
                self._cache[token] = (text, list(text.encode("utf-8")))
        return self._cache[token]


class Answer:
    """One request's output: Events in, text cut at stop strings and (chat) split into content,
    reasoning and tool calls, then rendered in OpenAI's shapes.

    The final stop id the engine reports is not text; a stop string ends the answer with
    finish_reason "stop" at the token that completed it (the caller then cancels the row).
    """

    def __init__(self, pieces: Pieces, stops: list[str], *, chat: bool, logprobs: bool):
        self.pieces, self.chat, self.with_logprobs = pieces, chat, logprobs
        self.detokenizer = pieces.tokenizer.detokenizer  # a fresh one per answer
        self.stops = StopMatcher(stops)
        self.parser = OutputParser() if chat else None
        self.total = Delta()
        self.call_ids: list[str] = []
        self.logprobs: list[tuple] = []  # (token, logprob, top) per token shown
        self.tokens = 0  # tokens this answer consumed (a final stop id included)
        self.usage = None  # the engine's running Usage
        self.finish_reason: str | None = None

    def feed(self, event) -> tuple[Delta, list[tuple]]:
        """The new text and logprobs an Event brings."""
        delta, logprobs = Delta(), []
        self.usage = event.usage
        text = event.tokens[:-1] if event.finish_reason == "stop" else event.tokens  # a stop id is not text
        self.tokens += len(event.tokens) - len(text)
        for i, token in enumerate(text):
            self.tokens += 1
            self.detokenizer.add_token(token)
            if self.with_logprobs and event.logprobs is not None:
                logprobs.append(
                    (token, event.logprobs[i], event.top_logprobs[i] if event.top_logprobs else ())
                )
            delta.add(self._shown(self.detokenizer.last_segment))
            if self.stops.matched:
                self._finish(delta, "stop")
                break
        if event.finish_reason is not None and self.finish_reason is None:
            self.detokenizer.finalize()
            delta.add(self._shown(self.detokenizer.last_segment))
            self._finish(delta, "stop" if self.stops.matched else event.finish_reason)
        self.total.add(delta)
        self.logprobs += logprobs
        return delta, logprobs

    def _shown(self, text: str) -> Delta:
        text = self.stops.feed(text)
        return self.parser.feed(text) if self.parser else Delta(content=text)

    def _finish(self, delta: Delta, reason: str) -> None:
        if not self.stops.matched:
            tail = self.stops.flush()
            delta.add(self.parser.feed(tail) if self.parser else Delta(content=tail))
        if self.parser:
            delta.add(self.parser.finish())
        called = self.parser is not None and self.parser.called
        self.finish_reason = (
            "tool_calls" if called and reason == "stop" and not self.stops.matched else reason
        )

    # ----------------------------------------------------------------------------------------
    # Rendering

    def _tool_calls(self, calls: list[ToolCall]) -> list[dict]:
        out = []
        for call in calls:
            self.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
            out.append(
                {
                    "index": len(self.call_ids) - 1,
                    "id": self.call_ids[-1],
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": json.dumps(call.arguments, ensure_ascii=False),
                    },
                }
            )
        return out

    def _logprobs(self, entries: list[tuple]) -> dict | None:
        if not self.with_logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(*entry) for entry in entries]}
        return {
            "tokens": [self.pieces(token)[0] for token, _, _ in entries],
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [{self.pieces(t)[0]: lp for t, lp in top} for _, _, top in entries],
        }

    def _chat_logprob(self, token: int, logprob: float, top) -> dict:
        text, raw = self.pieces(token)
        alternatives = []
        for t, lp in top:
            t_text, t_raw = self.pieces(t)
            alternatives.append({"token": t_text, "logprob": lp, "bytes": t_raw})
        return {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives}

    def usage_json(self) -> dict:
        u = self.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": u.prompt_tokens + self.tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        }

    def drafting_json(self) -> dict:
        """The extra field: this request's speculative decoding statistics."""
        u = self.usage
        return {
            "drafted": u.drafted,
            "accepted": u.accepted,
            "rounds": u.rounds,
            "mean_accepted": u.accepted / u.rounds if u.rounds else 0.0,
            "acceptance_rate": u.accepted / u.drafted if u.drafted else 0.0,
        }

    def _choice(self, body: dict, logprobs: dict | None, finish: str | None) -> dict:
        return {"index": 0, **body, "logprobs": logprobs, "finish_reason": finish}

    def first_chunk(self, meta: dict) -> dict | None:
        if not self.chat:
            return None
        return self._chunk(meta, [self._choice({"delta": {"role": "assistant", "content": ""}}, None, None)])

    def chunk(self, meta: dict, delta: Delta, logprobs: list[tuple]) -> dict:
        rendered = self._logprobs(logprobs)
        if not self.chat:
            return self._chunk(meta, [self._choice({"text": delta.content}, rendered, None)])
        body = {}
        if delta.content:
            body["content"] = delta.content
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            body["tool_calls"] = self._tool_calls(delta.tool_calls)
        return self._chunk(meta, [self._choice({"delta": body}, rendered, None)])

    def last_chunk(self, meta: dict) -> dict:
        body = {"delta": {}} if self.chat else {"text": ""}
        return {
            **self._chunk(meta, [self._choice(body, None, self.finish_reason)]),
            "drafting": self.drafting_json(),
        }

    def usage_chunk(self, meta: dict) -> dict:
        return {**self._chunk(meta, []), "usage": self.usage_json(), "drafting": self.drafting_json()}

    def _chunk(self, meta: dict, choices: list[dict]) -> dict:
        return {
            **meta,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "choices": choices,
        }

    def response(self, meta: dict) -> dict:
        """The whole answer, for a request without `stream`."""
        logprobs = self._logprobs(self.logprobs)
        if self.chat:
            # OpenAI's content is null beside tool calls when there is no text
            content = None if self.total.tool_calls and not self.total.content else self.total.content
            message = {"role": "assistant", "content": content}
            if self.total.reasoning:
                message["reasoning_content"] = self.total.reasoning
            if self.total.tool_calls:
                message["tool_calls"] = [
                    {k: v for k, v in call.items() if k != "index"}
                    for call in self._tool_calls(self.total.tool_calls)
                ]
            choice = self._choice({"message": message}, logprobs, self.finish_reason)
        else:
            choice = self._choice({"text": self.total.content}, logprobs, self.finish_reason)
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            **meta,
            "object": kind,
            "choices": [choice],
            "usage": self.usage_json(),
            "drafting": self.drafting_json(),
        }
