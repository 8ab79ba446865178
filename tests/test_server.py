"""`mlx-gemma-mtp serve` through the real `openai` client, on loopback.

The server runs in this process (uvicorn in a thread, the model on the server's worker thread)
so that its answers can be compared with in-process `generate` on the same fixture checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_gemma_mtp import cli, generate, load_pair, stream_generate
from mlx_gemma_mtp import server as server_module
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.server import ServeConfig, make_server
from mlx_gemma_mtp.worker import Job, Worker
from tests.engine_double import ScriptedEngine
from tests.fixtures import SPECIAL_TOKENS, build_tokenizer

KIND = "dense"
MAX_TOKENS = 24
PROMPTS = [
    "hello world", "the water is", "write a sentence about the model", "how do you know",
    "tell me the name", "what time is it", "give me three words", "the old man said",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(load_models, make_engine, **config):
    """A server on a free loopback port for the block's duration: (base URL, the Server)."""
    worker = Worker(load_models, make_engine)
    config = ServeConfig(model="tiny", max_tokens=config.pop("max_tokens", 1024), **config)
    server = make_server(worker, config, port=_free_port(), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


@pytest.fixture(scope="module")
def pair(checkpoints):
    return load_pair(checkpoints[KIND][0], checkpoints[KIND][1])


@pytest.fixture(scope="module")
def served(checkpoints):
    target_dir, drafter_dir = checkpoints[KIND]

    def make_engine(model, drafter):
        return Engine(model, drafter, num_draft_tokens=3, max_batch=8, prefix_cache_size=4)

    with serving(lambda: load_pair(target_dir, drafter_dir), make_engine) as (url, _):
        yield url


def _chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def _ask(client, text: str, **kwargs):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": text}],
        max_tokens=kwargs.pop("max_tokens", MAX_TOKENS),
        **kwargs,
    )


def _streamed(client, text: str, **kwargs) -> tuple[str, list]:
    chunks = list(_ask(client, text, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_greedy_answers_equal_in_process_generate(served, pair):
    model, tokenizer, drafter = pair
    client = _client(served)
    for text in PROMPTS[:2]:
        ids = _chat_ids(tokenizer, text)
        expected = generate(
            model, tokenizer, ids, max_tokens=MAX_TOKENS, draft_model=drafter, num_draft_tokens=3
        )
        whole = _ask(client, text)
        assert whole.choices[0].message.content == expected
        streamed, chunks = _streamed(client, text)
        assert streamed == expected
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    completion = client.completions.create(model="tiny", prompt="the sound of", max_tokens=MAX_TOKENS)
    assert completion.choices[0].text == generate(model, tokenizer, "the sound of", max_tokens=MAX_TOKENS)
    pieces = client.completions.create(
        model="tiny", prompt="the sound of", max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == completion.choices[0].text
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny"]


def test_concurrent_streams_equal_sequential_answers_while_one_drops(served):
    client = _client(served)
    sequential = [_ask(client, text).choices[0].message.content for text in PROMPTS]
    cancelled_before = _health(served)["cancelled"]
    dropped = threading.Event()

    def drop():  # reads one chunk of a long answer, then hangs up
        stream = _ask(client, "the long one", max_tokens=3000, stream=True)
        next(iter(stream))
        stream.close()
        dropped.set()

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        leaver = pool.submit(drop)
        answers = list(pool.map(lambda text: _streamed(client, text)[0], PROMPTS))
        leaver.result()
    assert answers == sequential
    deadline = time.monotonic() + 10  # far less than 3000 tokens take
    while (health := _health(served))["rows"] or health["cancelled"] == cancelled_before:
        assert time.monotonic() < deadline, f"the dropped stream's row was not freed: {health}"
        time.sleep(0.05)
    assert health["pending"] == 0


def _plain_decoding(model, prompt: list[int], max_tokens: int, top: int) -> list:
    """The events of plain decoding (no drafter), in this thread: the reference logprobs."""
    engine = Engine(model, None, max_batch=1)
    engine.add(Request(prompt=prompt, max_tokens=max_tokens, logprobs=top))
    events = []
    while engine.busy:
        events += engine.step()
    return events


def test_logprobs_equal_plain_decoding(served, pair):
    model, tokenizer, _ = pair
    text = PROMPTS[2]
    events = _plain_decoding(model, _chat_ids(tokenizer, text), MAX_TOKENS, top=3)
    tokens = [t for e in events for t in e.tokens]
    logprobs = [v for e in events for v in e.logprobs]
    tops = [t for e in events for t in e.top_logprobs]
    answer = _ask(_client(served), text, logprobs=True, top_logprobs=3)
    assert answer.model_extra["drafting"]["drafted"] > 0  # speculation was on
    entries = answer.choices[0].logprobs.content
    shown = len(tokens) - (events[-1].finish_reason == "stop")  # a stop id is not text
    assert len(entries) == shown
    for entry, token, logprob, top in zip(entries, tokens, logprobs, tops):
        assert entry.token == tokenizer.decode([token])
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is on top
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t, _ in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
    legacy = _client(served).completions.create(model="tiny", prompt="the sound of", max_tokens=4, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(
        len(t) == 2 for t in lp.top_logprobs
    )


def test_stop_strings_end_the_answer_across_token_boundaries(served, pair):
    model, tokenizer, _ = pair
    text = PROMPTS[3]
    responses = list(stream_generate(model, tokenizer, _chat_ids(tokenizer, text), max_tokens=MAX_TOKENS))
    full = "".join(r.text for r in responses)
    # A stop string straddling two tokens' text, in the middle of the answer.
    ends = [sum(len(r.text) for r in responses[: i + 1]) for i in range(len(responses))]
    boundary = next(
        e for e in ends if len(full) // 3 <= e and full[e - 2 : e + 2].strip() == full[e - 2 : e + 2]
    )
    stop = full[boundary - 2 : boundary + 2]
    expected = full[: full.index(stop)]
    client = _client(served)
    whole = _ask(client, text, stop=[stop, "never there"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    streamed, chunks = _streamed(client, text, stop=stop)
    assert streamed == expected and chunks[-1].choices[0].finish_reason == "stop"
    assert _ask(client, text, stop="never there").choices[0].message.content == full


def test_usage_and_drafting_statistics(served, pair):
    model, tokenizer, _ = pair
    text = PROMPTS[4]
    prompt = _chat_ids(tokenizer, text)
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)]
    client = _client(served)
    whole = _ask(client, text)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), len(tokens))
    assert whole.usage.total_tokens == len(prompt) + len(tokens)
    drafting = whole.model_extra["drafting"]
    assert 0 < drafting["accepted"] <= drafting["drafted"]
    rounds = drafting["rounds"]
    assert drafting["mean_accepted"] == pytest.approx(drafting["accepted"] / rounds if rounds else 0.0)
    _, chunks = _streamed(client, text, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    engine = _health(served)["engine"]  # the worker's totals: how full the batch ran, where time went
    assert engine["steps"] >= rounds and engine["rows"] >= 1
    assert 0 < engine["device_wait_seconds"] < engine["step_seconds"]
    # ... and what its drafting rounds drafted: every row-round at least a draft
    assert engine["drafting_rows"] >= rounds > 0
    assert engine["drafted_squares"] >= engine["drafted"] >= engine["drafting_rows"]


def test_the_next_turn_reuses_the_cache(served, pair):
    _, tokenizer, _ = pair
    client = _client(served)
    first = [{"role": "user", "content": "a new conversation about water"}]
    answer = client.chat.completions.create(model="tiny", messages=first, max_tokens=MAX_TOKENS)
    turn = [
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "and"},
    ]
    again = client.chat.completions.create(model="tiny", messages=first + turn, max_tokens=4)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert len(_chat_ids(tokenizer, first[0]["content"])) <= cached < again.usage.prompt_tokens


BAD_CHAT_BODIES = [
    (b"{not json", None),
    (b'{"model": "tiny"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": "hello"}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1.0}', "presence_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}', None),
]


def test_bad_requests_get_400_and_disturb_nothing(served):
    client = _client(served)
    expected = _ask(client, PROMPTS[5], max_tokens=60).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: _streamed(client, PROMPTS[5], max_tokens=60)[0])
        bodies = [("/v1/chat/completions", body, param) for body, param in BAD_CHAT_BODIES]
        long_prompt = json.dumps({"messages": [{"role": "user", "content": "the " * 5000}]}).encode()
        bodies += [
            ("/v1/chat/completions", long_prompt, None),  # over the context: the engine's check
            ("/v1/completions", b'{"prompt": [1, 2, 99999]}', None),  # outside the vocabulary
            ("/v1/completions", b'{"prompt": ["a", "b"]}', None),
            ("/v1/completions", b'{"prompt": "hi", "echo": true}', None),
        ]
        for path, body, param in bodies:
            response = httpx.post(
                f"{served}{path}", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        with pytest.raises(openai.BadRequestError, match="must be 1"):
            _ask(client, "hi", n=2)
        assert running.result() == expected
    assert _ask(client, PROMPTS[5], max_tokens=60).choices[0].message.content == expected
    assert httpx.get(f"{served}/nowhere").json()["error"]["message"] == "Not Found"


# --------------------------------------------------------------------------------------------
# Gemma 4's chat format: a scripted engine speaks it, through the fixture tokenizer with the
# format's markers as special tokens (at their Gemma 4 ids) or spelled out in characters.

GEMMA4_MARKERS = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
}  # fmt: skip
TOOL_RESPONSE_ID = 50

# Gemma 4's turn layout with tools, thinking and tool results, as the shipped chat template
# renders it (../shared/reference/gemma4/README.md), for the conversations these tests send.
GEMMA4_TEMPLATE = r"""
{%- macro value(v) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is mapping -%}{ {%- for k, x in v | dictsort -%}{{ k }}:{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%} }
{%- elif v is sequence -%}[{%- for x in v -%}{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%}]
{%- else -%}{{ v }}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set turns = messages -%}
{%- if enable_thinking or tools or messages[0]['role'] == 'system' -%}
{{- '<|turn>system\n' -}}
{%- if enable_thinking -%}<|think|>{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- set turns = messages[1:] -%}{%- endif -%}
{%- for tool in tools or [] -%}
<|tool>declaration:{{ tool['function']['name'] }}{description:<|"|>{{ tool['function']['description'] }}<|"|>}<tool|>
{%- endfor -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for m in turns -%}
{{- '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' -}}
{%- for call in m['tool_calls'] or [] -%}
<|tool_call>call:{{ call['function']['name'] }}{{ value(call['function']['arguments']) }}<tool_call|>
{%- endfor -%}
{%- for r in m['tool_responses'] or [] -%}
<|tool_response>response:{{ r['name'] }}{{ value(r['response']) if r['response'] is mapping else '{value:' + value(r['response']) + '}' }}<tool_response|>
{%- endfor -%}
{{- m['content'] or '' -}}
{%- if not (m['tool_responses'] and not m['content']) -%}{{- '<turn|>\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if not (turns and turns[-1]['tool_responses'] and not turns[-1]['content']) -%}{{- '<|turn>model\n' -}}{%- endif -%}
{%- if not enable_thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

THOUGHT = "The user wants the weather; the tool knows."
SPOKEN = "Let me look."
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


@pytest.fixture(scope="module", params=["special", "spelled"])
def gemma4_tokenizer(request, tmp_path_factory):
    """The fixture tokenizer with Gemma 4's template; its markers single special tokens, or (to
    split them across tokens and chunks) plain text."""
    specials = {**SPECIAL_TOKENS, **GEMMA4_MARKERS} if request.param == "special" else SPECIAL_TOKENS
    directory = tmp_path_factory.mktemp(f"gemma4-{request.param}")
    build_tokenizer(directory, special_tokens=specials, chat_template=GEMMA4_TEMPLATE)
    return load_tokenizer(directory), TOOL_RESPONSE_ID if request.param == "special" else 106


@contextlib.contextmanager
def scripted(model, tokenizer, script_ids, stop_id, **config):
    engine = ScriptedEngine(model, script_ids, stop_ids=[stop_id])
    with serving(lambda: (None, tokenizer, None), lambda m, d: engine, **config) as (url, server):
        yield url, engine, server


def test_tools_and_reasoning_are_parsed(gemma4_tokenizer, pair):
    tokenizer, stop_id = gemma4_tokenizer
    answer = f"<|channel>thought\n{THOUGHT}<channel|>{SPOKEN}{CALL}"
    script = tokenizer.encode(answer, add_special_tokens=False) + [stop_id]
    question = [{"role": "user", "content": "Weather in Paris?"}]
    with scripted(pair[0], tokenizer, script, stop_id) as (url, engine, _):
        client = _client(url)
        thinking = {"chat_template_kwargs": {"enable_thinking": True}}
        whole = client.chat.completions.create(
            model="tiny", messages=question, tools=[WEATHER_TOOL], extra_body=thinking
        )
        prompt = tokenizer.decode(engine.prompts[-1])
        assert prompt.startswith("<bos><|turn>system\n<|think|><|tool>declaration:get_weather{description:")
        assert prompt.endswith("<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n")
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert (choice.message.content, choice.message.model_extra["reasoning_content"]) == (SPOKEN, THOUGHT)
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris",
            "days": 3,
        }

        chunks = list(
            client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER_TOOL], stream=True)
        )
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(d.content or "" for d in deltas) == SPOKEN
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == THOUGHT
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
            (0, "get_weather", {"city": "Paris", "days": 3})
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # The result goes back: the model's turn goes on after it, thinking off (an empty thought).
        followup = question + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ]
        client.chat.completions.create(model="tiny", messages=followup, tools=[WEATHER_TOOL])
        prompt = tokenizer.decode(engine.prompts[-1])
        assert prompt.endswith(
            "<|turn>model\n" + CALL + "<|tool_response>response:get_weather{temp:21}<tool_response|>"
            "<|channel>thought\n<channel|>"
        )


# --------------------------------------------------------------------------------------------
# Back-pressure, shutdown, load


@pytest.fixture(scope="module")
def plain_tokenizer(checkpoints):
    return load_tokenizer(checkpoints[KIND][0])


def _script(tokenizer, words: int) -> list[int]:
    return tokenizer.encode(" ".join(["the model"] * words), add_special_tokens=False)


def test_a_full_queue_answers_429_with_retry_after(plain_tokenizer, pair):
    gate = threading.Event()
    engine = ScriptedEngine(pair[0], _script(plain_tokenizer, 10), stop_ids=[106], gate=gate)
    with serving(lambda: (None, plain_tokenizer, None), lambda m, d: engine, max_pending=2) as (url, _):
        client = _client(url)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(_streamed, client, "hi", max_tokens=8) for _ in range(2)]
            while _health(url)["pending"] < 2:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as refused:
                _ask(client, "one more")
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["type"] == "rate_limit_error"
            gate.set()
            assert [f.result()[0] for f in held] == [plain_tokenizer.decode(engine.script[:8])] * 2
        assert _ask(client, "now", max_tokens=8).choices[0].finish_reason == "length"
        assert _health(url)["rejected"] == 1


class _Logged(ScriptedEngine):
    """Records its adds and steps in order: ("add", rid) and ("step", rids that finished)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []

    def add(self, request: Request) -> int:
        rid = super().add(request)
        self.log.append(("add", rid))
        return rid

    def step(self):
        events = super().step()
        self.log.append(("step", {e.rid for e in events if e.finish_reason}))
        return events


def _client_behind_a_long_row(tokenizer, pair, gap: float, requests: int, slack: float = 0.0):
    """One long row decodes (50 ms steps, a token each) while a client sends `requests`
    two-token requests, each `gap` s after its last answer ended, the engine saying `slack`.
    The engine's log of adds and steps, for each follow-up request the steps between the end
    before it and its add, and the worker's totals."""
    engine = _Logged(pair[0], _script(tokenizer, 400), stop_ids=[106], chunks=(1,), delay=0.05)
    engine.slack = slack
    worker = Worker(lambda: (None, tokenizer, None), lambda m, d: engine)
    worker.start()
    prompt = tokenizer.encode("hi", add_special_tokens=False)
    done, left = threading.Event(), [requests]

    def again(item):  # the client: its next request `gap` s after each answer
        if getattr(item, "finish_reason", None):
            left[0] -= 1
            if not left[0]:
                done.set()
                return
            threading.Timer(gap, worker.submit, [Job(Request(prompt=prompt, max_tokens=2), again)]).start()

    long = Job(Request(prompt=prompt, max_tokens=300), lambda item: None)
    worker.submit(long)
    worker.submit(Job(Request(prompt=prompt, max_tokens=2), again))
    try:
        assert done.wait(20), "the client's requests did not finish"
    finally:
        worker.cancel(long)
        worker.stop(10)
    log = engine.log
    ends = [i for i, (what, arg) in enumerate(log) if what == "step" and arg - {0}]
    adds = [i for i, (what, rid) in enumerate(log) if what == "add" and rid >= 2]
    return log, [[w for w, _ in log[e + 1 : a]].count("step") for e, a in zip(ends, adds)], worker.stats


@pytest.mark.parametrize("slack", [1.0, 0.0])
def test_a_request_sent_when_an_answer_ends_joins_the_next_step_if_the_device_is_busy(
    plain_tokenizer, pair, slack
):
    """A row ends; its client's next request comes 20 ms later. The worker waits for it before
    the next step (up to half of the engine's slack: what the last read-back waited for the
    device, with a round queued behind it): it joins a step sooner than one arriving during that
    step would. With no slack (nothing in flight, or a host slower than the device), the other
    rows' next step goes first."""
    log, (steps_before,), stats = _client_behind_a_long_row(plain_tokenizer, pair, 0.02, 2, slack)
    assert steps_before == 0 if slack else steps_before >= 1, log
    # the worker's totals say so too: it waited for the request (~20 ms)
    assert stats.join_wait_seconds > 0.01 or not slack, stats
    assert stats.steps == [what for what, _ in log].count("step") and stats.rows >= stats.steps - 2
    assert stats.step_seconds >= 0.05 * stats.steps
    # one request followed a row's end, 20 ms later (its client's timer) and then some
    assert stats.refills == 1 and 0.02 <= stats.refill_seconds < 1.0, stats


@pytest.mark.parametrize("gap, waits", [(0.005, True), (0.04, False)])
def test_a_host_bound_worker_waits_for_requests_that_come_quickly(plain_tokenizer, pair, gap, waits):
    """No slack (the host bounds the steps, 50 ms each here), one row staying: a request that
    follows an ended row within half a step (the wait's budget: half of a step x 1 awaited / 1
    staying) joins the next step once the worker has seen requests come that quickly; one that
    comes later is never waited for (a wait there would only delay the staying row)."""
    log, steps_between, _ = _client_behind_a_long_row(plain_tokenizer, pair, gap, 6)
    assert len(steps_between) == 5 and steps_between[0] >= 1, log  # the first: nothing known yet
    assert all(n == 0 for n in steps_between[1:]) if waits else all(n >= 1 for n in steps_between), log


def test_sigterm_finishes_or_errors_what_is_in_flight(plain_tokenizer, pair):
    engine = ScriptedEngine(pair[0], _script(plain_tokenizer, 300), stop_ids=[106], delay=0.02)
    with serving(lambda: (None, plain_tokenizer, None), lambda m, d: engine, grace=1.5) as (url, server):
        client = _client(url)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(_streamed, client, "long", max_tokens=500)  # ~4 s of steps
            while _health(url)["rows"] < 1:
                time.sleep(0.01)
            short = pool.submit(_streamed, client, "short", max_tokens=20)  # ~0.2 s
            while _health(url)["rows"] < 2:
                time.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            assert short.result()[0] == plain_tokenizer.decode(engine.script[:20])
            with pytest.raises(openai.APIError, match="shutting down"):
                long.result()
        with pytest.raises((httpx.ConnectError, AssertionError)):  # closed, or refusing
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code != 503


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _quiet(url: str, seconds: float) -> dict:
    """/health once no row runs and no request is in flight (within `seconds`)."""
    deadline = time.monotonic() + seconds
    while (health := _health(url))["rows"] or health["pending"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_load_nothing_lost_memory_flat(served):
    """200 requests from 16 clients, every 25th dropped mid-stream: every other one ends with a
    complete answer (the same for the same prompt), no request's state outlives it, and memory
    does not grow with the count."""
    client = _client(served)
    before = _health(served)

    def one(i: int):
        text = f"{PROMPTS[i % len(PROMPTS)]} {i % 5}"
        if i % 25 == 7:
            stream = _ask(client, text, max_tokens=3000, stream=True)
            next(iter(stream))
            stream.close()
            return text, None
        answer = _ask(client, text, max_tokens=4)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
        return text, answer.choices[0].message.content

    outcomes, memory = [], []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for start in (0, 100):
            outcomes += pool.map(one, range(start, start + 100))
            _quiet(served, 3)  # the dropped rows' 3000 tokens would take far longer
            for text in PROMPTS[:4]:  # the prefix cache (4 entries) in the same state at each reading
                _ask(client, text, max_tokens=4)
            memory.append((_rss_peak(), mx.get_active_memory()))
    answers: dict[str, set] = {}
    for text, content in outcomes:
        if content is not None:
            answers.setdefault(text, set()).add(content)
    assert len(outcomes) == 200 and all(len(seen) == 1 for seen in answers.values())
    health = _quiet(served, 3)
    assert health["served"] - before["served"] == 192 + 8 and health["cancelled"] - before["cancelled"] == 8
    gc.collect()
    assert not [
        o for o in gc.get_objects() if type(o) in (server_module.Run, Job)
    ]  # nothing kept per request
    (rss_half, mlx_half), (rss_end, mlx_end) = memory
    assert rss_end <= rss_half * 1.05, memory  # peak resident memory: flat over the second 100
    # MLX buffers: the model and 4 kept caches, whose sizes vary with what they held (a reused
    # cache keeps its capacity): a few MB here, where a cache kept per request would add tens.
    assert mlx_end <= mlx_half * 1.5 + 2**20, memory


def test_serve_command_wires_flags_to_the_server(checkpoints, monkeypatch, capsys):
    target_dir, drafter_dir = checkpoints[KIND]
    started = []
    monkeypatch.setattr(server_module.Server, "run", lambda self: started.append(self))
    argv = ["serve", "--model", str(target_dir), "--draft-model", str(drafter_dir), "--port", "9999", "-k", "2",
            "--max-batch", "3", "--max-queue", "5", "--temperature", "0.5", "--served-model-name", "gemma"]  # fmt: skip
    assert cli.main(argv) == 0
    (server,) = started
    service = server.service
    try:
        assert (server.config.host, server.config.port) == ("127.0.0.1", 9999)
        assert service.config.model == "gemma" and service.config.max_pending == 8
        assert service.config.sampling == {"temperature": 0.5}
        assert service.worker.drafter_source == str(drafter_dir)
    finally:
        service.worker.stop()
    with pytest.raises(SystemExit) as two_models:
        cli.main(["serve", "a", "--model", "b"])
    assert two_models.value.code == 2 and "two models" in capsys.readouterr().err


def test_the_command_serves_until_sigterm(checkpoints):
    """`python -m mlx_gemma_mtp serve` as users start it: answers, then on SIGTERM ends the
    request in flight with an error after the grace period and exits."""
    target_dir, drafter_dir = checkpoints[KIND]
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_gemma_mtp",
        "serve",
        str(target_dir),
        "--draft-model",
        str(drafter_dir),
    ]
    command += ["--port", str(port), "-k", "2", "--shutdown-grace", "0.5", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            assert process.poll() is None and time.monotonic() < deadline, (
                process.stderr.read() if process.poll() else ""
            )
            time.sleep(0.1)
        client = _client(url)
        assert _ask(client, PROMPTS[0], max_tokens=4).choices[0].finish_reason == "length"
        stream = iter(_ask(client, PROMPTS[1], max_tokens=3000, stream=True))
        next(stream)
        process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
        # uvicorn re-raises the signal once it has shut down: the conventional exit of SIGTERM
        assert process.wait(30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.ConnectError:
        return False
