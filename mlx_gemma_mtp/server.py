"""`mlx-gemma-mtp serve`: an OpenAI-compatible HTTP server over the batched engine.

Every request is a row of the engine's batch, decoded speculatively with the drafter. The
event loop (FastAPI on uvicorn) validates requests, renders prompts, turns the engine's token
ids into OpenAI's responses and streams them; the model and the engine live on one worker
thread (`worker.py`), which the handlers reach only by queueing commands.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
Request and response shapes are in `openai_api.py`; Gemma 4's chat format in `chat_format.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .chat_format import template_messages
from .engine import Event, Request
from .generate import encode_prompt
from .openai_api import Answer, ChatRequest, CompletionRequest, Pieces, error_body
from .sample import make_sampling
from .worker import Job, ServiceError, Worker

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# chat_template_kwargs the server sets itself
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize", "conversation"}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What the server was started with."""

    model: str  # the model id /v1/models lists and responses carry
    max_tokens: int  # for a request that names no max_tokens
    sampling: dict = field(default_factory=dict)  # defaults of SAMPLING_FIELDS (unset: the library's)
    max_pending: int = 40  # requests admitted at once (rows of the batch plus the queue); more: 429
    grace: float = 30.0  # seconds requests in flight get to finish after SIGTERM


def _error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Run:
    """One request's row as the event loop sees it: Events arrive on an asyncio queue fed
    from the worker thread."""

    def __init__(self, service: Service, request: Request):
        self._service, self._loop = service, asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self.finished = self._closed = False
        self.job = Job(request, self._deliver)
        service.worker.submit(self.job)

    def _deliver(self, item) -> None:  # on the worker thread
        with contextlib.suppress(RuntimeError):  # the event loop closed: the server has stopped
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    async def _next_item(self):
        item = await self._items.get()
        if isinstance(item, Exception):
            self.finished = True
            raise item
        return item

    async def accepted(self) -> None:
        """Wait until the engine took the request; RequestError when it refused it."""
        await self._next_item()

    async def next(self) -> Event:
        event = await self._next_item()
        self.finished = event.finish_reason is not None
        return event

    def cancel(self, keep: int | None = None) -> None:
        """Free the row unless it finished; `keep`: the tokens the answer used (a stop string
        may end it inside an event), which is what the prefix cache should hold."""
        if not self.finished:
            self.finished = True
            self._service.worker.cancel(self.job, keep)

    def close(self) -> None:
        """Free the row if it still runs, and the admission (idempotent)."""
        self.cancel()
        if not self._closed:
            self._closed = True
            self._service.release()


class Service:
    """The server's state on the event loop: admission, prompts, the request life cycle."""

    def __init__(self, worker: Worker, tokenizer, config: ServeConfig):
        self.worker, self.tokenizer, self.config = worker, tokenizer, config
        self.pieces = Pieces(tokenizer)
        self.pending = 0  # admitted requests not yet closed
        self.draining = False
        self.counts = {"served": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self.started = int(time.time())

    def drain(self) -> None:
        """SIGTERM: admit nothing more; what runs gets `grace` seconds to finish."""
        self.draining = True
        self.worker.drain(self.config.grace)

    def admit(self) -> JSONResponse | None:
        """None when the request may go on (then `release` once it ends), else the refusal."""
        if self.draining:
            return _error(503, "the server is shutting down", "server_error")
        if self.pending >= self.config.max_pending:
            self.counts["rejected"] += 1
            message = f"the server is busy ({self.pending} requests in flight); retry shortly"
            return _error(429, message, "rate_limit_error", headers={"Retry-After": "1"})
        self.pending += 1
        return None

    def release(self) -> None:
        self.pending -= 1

    # ----------------------------------------------------------------------------------------
    # Prompts and engine requests (rendering runs in a thread: long prompts take a while)

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        if not self.tokenizer.has_chat_template:
            raise ValueError("the model has no chat template: use /v1/completions")
        messages = template_messages([m.model_dump(exclude_none=True) for m in body.messages])
        tools = None
        if body.tools and body.tool_choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
        kwargs = dict(body.chat_template_kwargs or {})
        if reserved := RESERVED_TEMPLATE_KWARGS & kwargs.keys():
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}: the server sets them")
        # Thinking is off unless asked for, as in Gemma 4's template (mlx-lm's wrapper would
        # turn it on for any tokenizer that has the channel tokens).
        kwargs.setdefault("enable_thinking", False)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
            else body.prompt
        )
        return encode_prompt(self.tokenizer, prompt)

    def engine_request(self, prompt: list[int], body, logprobs: int | None) -> Request:
        settings = dict(self.config.sampling)
        settings.update({k: getattr(body, k) for k in SAMPLING_FIELDS if getattr(body, k) is not None})
        return Request(
            prompt=prompt,
            max_tokens=body.max_new_tokens or self.config.max_tokens,
            sampling=make_sampling(**settings, seed=body.seed),
            logprobs=logprobs,
        )

    # ----------------------------------------------------------------------------------------
    # The request life cycle

    async def handle(self, http: HTTPRequest, body: ChatRequest | CompletionRequest):
        if refusal := self.admit():
            return refusal
        run, streaming = None, False
        try:
            chat = isinstance(body, ChatRequest)
            prompt = await asyncio.to_thread(self.chat_prompt if chat else self.completion_prompt, body)
            run = Run(self, self.engine_request(prompt, body, body.logprobs_count))
            await run.accepted()
            answer = Answer(
                self.pieces, body.stop_strings, chat=chat, logprobs=body.logprobs_count is not None
            )
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time())}
            meta["model"] = self.config.model
            if body.stream:
                streaming = True  # the stream closes the run (or, if it never starts, its background task)
                events = self._stream(run, answer, meta, body.include_usage)
                return StreamingResponse(
                    events, media_type="text/event-stream", background=BackgroundTask(run.close)
                )
            return await self._whole(http, run, answer, meta)
        except ValueError as e:  # RequestError included: the engine's check
            return _error(400, str(e), "invalid_request_error")
        except ServiceError as e:
            self.counts["failed"] += 1
            return _error(503, str(e), "server_error")
        finally:
            if run is None:
                self.release()
            elif not streaming:
                run.close()

    async def _whole(self, http: HTTPRequest, run: Run, answer: Answer, meta: dict) -> JSONResponse:
        watcher = asyncio.create_task(self._watch(http, run))
        try:
            while answer.finish_reason is None:
                answer.feed(await run.next())
            run.cancel(keep=answer.tokens)  # a stop string ended it: the row may still run
        finally:
            watcher.cancel()
        if answer.finish_reason == "cancelled":  # the client has left: nobody reads this
            self.counts["cancelled"] += 1
            return _error(499, "the client closed the request", "invalid_request_error")
        self.counts["served"] += 1
        return JSONResponse(answer.response(meta))

    @staticmethod
    async def _watch(http: HTTPRequest, run: Run) -> None:
        """Free the row as soon as the client disconnects (the body has been read, so the next
        ASGI message is the disconnect)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        run.cancel()

    async def _stream(self, run: Run, answer: Answer, meta: dict, include_usage: bool):
        """Server-sent events; a client that leaves closes this generator, which frees the row."""
        outcome = "cancelled"
        try:
            if first := answer.first_chunk(meta):
                yield _sse(first)
            while answer.finish_reason is None:
                delta, logprobs = answer.feed(await run.next())
                if delta or logprobs:
                    yield _sse(answer.chunk(meta, delta, logprobs))
            run.cancel(keep=answer.tokens)  # a stop string ended it: the row may still run
            yield _sse(answer.last_chunk(meta))
            if include_usage:
                yield _sse(answer.usage_chunk(meta))
            yield "data: [DONE]\n\n"
            outcome = "served"
        except ServiceError as e:
            outcome = "failed"
            yield _sse(error_body(str(e), "server_error"))
        finally:
            self.counts[outcome] += 1
            run.close()


# --------------------------------------------------------------------------------------------
# The app


async def _invalid_request(http: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint as OpenAI's 400, naming the field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return _error(400, message, "invalid_request_error")
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    # A validator's own ValueError reads as it was written, not as "Value error, ..."
    reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    return _error(
        400, f"{where}: {reason}" if where else reason, "invalid_request_error", param=where or None
    )


async def _http_error(http: HTTPRequest, exc: HTTPException) -> JSONResponse:
    """Unknown paths and methods, in OpenAI's error shape too."""
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")


def create_app(worker: Worker, tokenizer, config: ServeConfig) -> FastAPI:
    """The ASGI app over a started `worker`; stopping the app (lifespan end) stops the worker."""
    service = Service(worker, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="mlx-gemma-mtp", lifespan=lifespan)
    app.state.service = service

    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        return await service.handle(http, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await service.handle(http, body)

    @app.get("/v1/models")
    async def models():
        model = {
            "id": config.model,
            "object": "model",
            "created": service.started,
            "owned_by": "mlx-gemma-mtp",
        }
        return {"object": "list", "data": [{**model, "drafter": worker.drafter_source}]}

    @app.get("/health")
    async def health():
        state = {"model": config.model, "drafter": worker.drafter_source, "rows": worker.rows}
        state["pending"] = service.pending
        state.update(service.counts)
        state["engine"] = asdict(worker.stats)
        if service.draining:
            return JSONResponse({"status": "shutting down", **state}, status_code=503)
        return {"status": "ok", **state}

    return app


class Server(uvicorn.Server):
    """uvicorn's server, telling the service first when SIGTERM / SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        if not self.service.draining:
            log.info(
                "shutting down: %d requests in flight get %.0f s",
                self.service.pending,
                self.service.config.grace,
            )
            self.service.drain()
        super().handle_exit(sig, frame)


def make_server(
    worker: Worker, config: ServeConfig, *, host="127.0.0.1", port=8080, log_level="info"
) -> Server:
    """Start the worker (loading the model: errors raise here) and the server around it; `run()`
    serves until SIGTERM or Ctrl-C."""
    tokenizer = worker.start()
    app = create_app(worker, tokenizer, config)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=config.grace + 5
    )
    return Server(uv_config, app.state.service)
