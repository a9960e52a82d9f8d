"""OpenAI-compatible HTTP API on the engine, and the server that also carries the web app.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain JSON, or server-sent events with
``"stream": true``), following the shape of OpenAI's Chat Completions API so that the ``openai`` Python client
works against it. Conversations are fitted into the context by :func:`qtune.serve.session.fit_messages`; the
number of turns left out is returned in the ``X-Qtune-Dropped-Turns`` header. Bad requests (malformed JSON,
missing or out-of-range fields, a conversation that does not fit) get status 400 and an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``; with ``auth`` set, requests need
``Authorization: Bearer USER:PASS`` (the ``openai`` client's ``api_key="USER:PASS"``) or HTTP Basic auth.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from typing import Iterator, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qtune.serve.engine import Engine, GenerationSettings, StreamState
from qtune.serve.session import ContextOverflow, fit_messages


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
    messages: list[ChatMessage] = Field(min_length=1)
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


def _settings(req: ChatRequest, defaults: GenerationSettings) -> GenerationSettings:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return GenerationSettings(
        max_new_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        stop=tuple(defaults.stop) + tuple(stop),
    )


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

    @router.get("/models")
    def models(request: Request):
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
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _ApiError(400, f"request body is not valid JSON: {e}") from None
            try:
                req = ChatRequest.model_validate(body)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise _ApiError(400, f"{where}: {err['msg']}", param=where) from None
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                settings = _settings(req, defaults)
                fitted = fit_messages(engine, messages, settings)
            except ContextOverflow as e:
                raise _ApiError(400, str(e), code="context_length_exceeded") from None
            except ValueError as e:
                raise _ApiError(400, str(e), param="messages") from None
        except _ApiError as e:
            return e.response()

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {"X-Qtune-Dropped-Turns": str(fitted.dropped)}
        state = StreamState()
        if not req.stream:
            from starlette.concurrency import run_in_threadpool

            text = await run_in_threadpool(lambda: "".join(engine.stream(fitted.prompt_ids, settings, state)))
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "finish_reason": state.finish_reason}],
                "usage": {"prompt_tokens": state.prompt_tokens, "completion_tokens": state.completion_tokens,
                          "total_tokens": state.prompt_tokens + state.completion_tokens},
            }, headers=headers)

        def chunk(delta: dict, finish: str | None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for piece in engine.stream(fitted.prompt_ids, settings, state):
                yield chunk({"content": piece}, None)
            yield chunk({}, state.finish_reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

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
    return app
