"""OpenAI-compatible HTTP API on the engine, and the server that also carries the web app.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain JSON, or server-sent events with
``"stream": true``), following the shape of OpenAI's Chat Completions API so that the ``openai`` Python client
works against it. Conversations are fitted into the context by :func:`qtune.serve.session.fit_messages`; the
number of turns left out is returned in the ``X-Qtune-Dropped-Turns`` header. Bad requests (malformed JSON,
missing or out-of-range fields, a conversation that does not fit) get status 400 and an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``; with ``auth`` set, requests need
``Authorization: Bearer USER:PASS`` (the ``openai`` client's ``api_key="USER:PASS"``) or HTTP Basic auth.

One request cannot hold the server: the event loop only reads the body and passes bytes; parsing, validation,
tokenization (fitting the conversation) and generation run in worker threads (those waiting for the engine at
most ``MAX_WAITING_THREADS``, so that the web app always finds one), and every per-request cost is bounded
before the engine is taken:

- ``MAX_BODY_BYTES`` (1 MiB): a larger body gets 413 before it is read to the end. That is some 250k tokens of
  text, 30 times the largest context served (SmolLM2's 8192), so long histories still fit (old turns are left
  out of the prompt).
- ``MAX_MESSAGES`` (4096): more messages get 400. Fitting is linear in the messages (each tokenized at most once,
  newest first); the cap bounds the checks done before fitting.
- ``MAX_JSON_DEPTH`` (32): a body nested deeper gets 400 (a request needs 5 levels); so does one too deep for
  Python's parser (RecursionError), never a 500.
- ``stop``: at most 4 strings of at most 64 characters (``qtune.serve.engine.MAX_STOP_STRINGS`` /
  ``MAX_STOP_CHARS``), else 400; ``max_tokens`` must leave room for the prompt in the context, else 400.

A client that disconnects (streamed or not) cancels its generation at the next token, and :func:`run_server`
cancels every generation on SIGINT/SIGTERM, so the server exits within a few seconds.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from typing import AsyncIterator, Literal

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Mount

from qtune.serve.engine import Engine, GenerationSettings, SettingsError, StreamState
from qtune.serve.session import ContextOverflow, Fitted, fit_messages

MAX_BODY_BYTES = 1 << 20
"""Largest request body (1 MiB), answered 413 beyond: bounds reading, parsing and tokenizing one request."""
MAX_MESSAGES = 4096
"""Most messages in one request, answered 400 beyond: bounds validation before the conversation is fitted."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of the JSON body (a chat request needs 5 levels), answered 400 beyond."""
MAX_WAITING_THREADS = 64
"""Worker threads that API requests may hold while waiting for the engine (more wait without a thread), so that
they never take all of the shared thread pool that the web app and request parsing run in."""
SHUTDOWN_GRACE_S = 3
"""Seconds :func:`run_server` waits for open connections (web-app heartbeats) after SIGTERM before closing them."""


class _ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a request; content is text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completion request the engine honours; other fields are ignored.

    Unset sampling fields take the server's defaults (greedy unless ``qtune serve`` was given a temperature).
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


def _check_auth(request: Request, auth: tuple[str, str] | None) -> None:
    if auth is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip()).decode()
        except (ValueError, UnicodeDecodeError):
            given = ""
    if not secrets.compare_digest(given.encode(), f"{auth[0]}:{auth[1]}".encode()):
        raise _ApiError(401, "missing or wrong credentials: send 'Authorization: Bearer USER:PASS'",
                        type="authentication_error", code="invalid_api_key")


def _settings_error(e: SettingsError) -> _ApiError:
    return _ApiError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(e.field, e.field))


def _settings(req: ChatRequest, defaults: GenerationSettings) -> GenerationSettings:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return GenerationSettings(
            max_new_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            repetition_penalty=(defaults.repetition_penalty if req.repetition_penalty is None
                                else req.repetition_penalty),
            stop=tuple(defaults.stop) + tuple(stop),
        )
    except SettingsError as e:
        raise _settings_error(e) from None


async def _read_body(request: Request) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``MAX_BODY_BYTES``."""
    too_large = _ApiError(413, f"request body over {MAX_BODY_BYTES} bytes; send a shorter conversation",
                          code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse(raw: bytes) -> ChatRequest:
    """The validated request (runs in a worker thread).

    Raises:
        _ApiError: 400 for malformed or too deeply nested JSON, or fields out of range.
    """
    too_deep = _ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw)
    except ValueError as e:  # also UnicodeDecodeError, and integers too long to convert
        raise _ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise too_deep from None
    if _json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise _ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise _ApiError(400, f"{where}: {err['msg']}", param=where) from None
    for i, m in enumerate(req.messages):
        try:
            m.text().encode("utf-8")
        except UnicodeEncodeError:
            raise _ApiError(400, f"messages.{i}.content: not valid Unicode (a lone surrogate escape)",
                            param=f"messages.{i}.content") from None
    return req


def _prepare(engine: Engine, raw: bytes, defaults: GenerationSettings) -> tuple[ChatRequest, GenerationSettings,
                                                                                 Fitted]:
    """Parse, validate and fit one request (runs in a worker thread: it tokenizes)."""
    req = _parse(raw)
    settings = _settings(req, defaults)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        fitted = fit_messages(engine, messages, settings)
    except ContextOverflow as e:
        raise _ApiError(400, str(e), code="context_length_exceeded") from None
    except SettingsError as e:
        raise _settings_error(e) from None
    except ValueError as e:
        raise _ApiError(400, str(e), param="messages") from None
    return req, settings, fitted


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read; the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _CancellingStream(StreamingResponse):
    """A streamed response that cancels its generation however it ends (done, client gone, server stopping)."""

    def __init__(self, content, cancel: threading.Event, **kwargs):
        super().__init__(content, **kwargs)
        self.cancel = cancel

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


SHUTTING_DOWN = "generation cancelled: the server is shutting down"


class _Pieces:
    """An engine stream consumed from the event loop: each piece is awaited in a worker thread, and waiting is
    abandoned at once when the request is cancelled; :meth:`close` then cancels the generation and waits (in a
    thread) until the engine is free."""

    def __init__(self, engine: Engine, fitted: Fitted, settings: GenerationSettings, state: StreamState,
                 limiter: anyio.CapacityLimiter):
        self.cancel, self._limiter = threading.Event(), limiter
        self._stream = engine.stream(fitted.prompt_ids, settings, state, self.cancel)
        self._lock = threading.Lock()  # a generator runs in one thread at a time: next() and close() take turns

    def _next(self) -> str | None:
        with self._lock:
            return next(self._stream, None)

    def _close(self) -> None:
        with self._lock:
            self._stream.close()

    async def next(self) -> str | None:
        """The next piece, or None at the end."""
        return await anyio.to_thread.run_sync(self._next, abandon_on_cancel=True, limiter=self._limiter)

    async def close(self) -> None:
        self.cancel.set()
        with anyio.CancelScope(shield=True):  # also when the request itself is being cancelled
            await anyio.to_thread.run_sync(self._close)


def api_router(engine: Engine, auth: tuple[str, str] | None = None,
               defaults: GenerationSettings | None = None) -> APIRouter:
    """The ``/v1`` routes on ``engine``.

    Args:
        engine: the loaded model; its ``name`` is the only model id listed.
        auth: (user, password) required on every request, or None for none.
        defaults: settings for fields a request leaves unset (greedy, 256 new tokens when None).
    """
    defaults = defaults or GenerationSettings()
    router = APIRouter(prefix="/v1")
    waiting = anyio.CapacityLimiter(MAX_WAITING_THREADS)

    @router.get("/models")
    async def models(request: Request):  # async: answers on the event loop, never waits for a worker thread
        try:
            _check_auth(request, auth)
        except _ApiError as e:
            return e.response()
        return {"object": "list",
                "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "qtune"}]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            _check_auth(request, auth)
            raw = await _read_body(request)
            req, settings, fitted = await anyio.to_thread.run_sync(_prepare, engine, raw, defaults)
        except _ApiError as e:
            return e.response()

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {"X-Qtune-Dropped-Turns": str(fitted.dropped)}
        state = StreamState()
        pieces = _Pieces(engine, fitted, settings, state, waiting)

        if not req.stream:
            text, gone = [], False
            async with anyio.create_task_group() as tg:
                async def watch():
                    nonlocal gone
                    await _until_disconnected(request)
                    gone = True
                    pieces.cancel.set()  # the client has gone: free the engine at the next token

                tg.start_soon(watch)
                try:
                    while (piece := await pieces.next()) is not None:
                        text.append(piece)
                finally:
                    tg.cancel_scope.cancel()
                    await pieces.close()
            if state.cancelled:
                message = "generation cancelled: the client disconnected" if gone else SHUTTING_DOWN
                return _ApiError(503, message, type="server_error", code="cancelled").response()
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": state.finish_reason}],
                "usage": {"prompt_tokens": state.prompt_tokens, "completion_tokens": state.completion_tokens,
                          "total_tokens": state.prompt_tokens + state.completion_tokens},
            }, headers=headers)

        def chunk(delta: dict, finish: str | None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                while (piece := await pieces.next()) is not None:
                    yield chunk({"content": piece}, None)
            finally:
                await pieces.close()
            if state.cancelled:
                error = {"message": SHUTTING_DOWN, "type": "server_error", "param": None, "code": "cancelled"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            yield chunk({}, state.finish_reason)
            yield "data: [DONE]\n\n"

        return _CancellingStream(events(), pieces.cancel, media_type="text/event-stream", headers=headers)

    return router


def create_app(engine: Engine, auth: tuple[str, str] | None = None, defaults: GenerationSettings | None = None,
               concurrency: int = 1, ui: bool = True) -> FastAPI:
    """The whole server: the ``/v1`` API and, at ``/``, the Gradio chat app (:func:`qtune.serve.web.build_ui`).

    Args:
        concurrency: web-app requests generating at once; more wait in Gradio's queue (generation itself is
            serialized by the engine's lock).
        ui: False serves the API alone.
    """
    app = FastAPI(title="qtune", docs_url=None, redoc_url=None)
    app.include_router(api_router(engine, auth, defaults))
    if ui:
        import gradio as gr

        from qtune.serve.web import CSS, build_ui

        blocks = build_ui(engine, defaults or GenerationSettings())
        blocks.queue(default_concurrency_limit=concurrency)
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, footer_links=[], css=CSS)
        web = next(r.app for r in app.routes if isinstance(r, Mount) and isinstance(r.app, gr.routes.App))
        app.state.on_shutdown = [web.stop_event.set]  # ends the web app's heartbeat streams
    return app


def run_server(app: FastAPI, engine: Engine, host: str, port: int, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM.

    On the signal every running generation is cancelled (:meth:`Engine.close`), so open answers end at their next
    token; connections still open after ``SHUTDOWN_GRACE_S`` seconds (web-app heartbeats) are closed, and the
    process exits within a few seconds.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.close()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            for stop in getattr(app.state, "on_shutdown", ()):
                stop()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    Server(config).run()
