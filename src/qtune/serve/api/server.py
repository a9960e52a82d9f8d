"""The server: the ``/v1`` routes (:func:`api_router`; credentials, then one path for both generation routes:
prepare in a worker thread, then answer), the whole app with the web UI mounted at ``/`` (:func:`create_app`), and
uvicorn with cancellation on shutdown (:func:`run_server`)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Mount

from qtune.serve.api.body import read_body
from qtune.serve.api.fields import ApiError
from qtune.serve.api.responses import chat_choice, completion_choice, respond
from qtune.serve.api.validation import ChatRequest, CompletionRequest, SamplingRequest, prepare
from qtune.serve.engine import Engine, GenerationSettings

MAX_WAITING_THREADS = 64
"""Worker threads that API requests may hold while waiting for the engine (more wait without a thread), so that
they never take all of the shared thread pool that the web app and request parsing run in."""
SHUTDOWN_GRACE_S = 3
"""Seconds :func:`run_server` waits for open connections (web-app heartbeats) after SIGTERM before closing them."""


def _check_auth(request: Request, auth: tuple[str, str] | None) -> None:
    """Nothing when ``auth`` is None or the request carries its credentials (Bearer ``USER:PASS`` or Basic).

    Raises:
        ApiError: 401 otherwise.
    """
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
        raise ApiError(
            401,
            "missing or wrong credentials: send 'Authorization: Bearer USER:PASS'",
            type="authentication_error",
            code="invalid_api_key",
        )


def api_router(
    engine: Engine, auth: tuple[str, str] | None = None, defaults: GenerationSettings | None = None
) -> APIRouter:
    """The ``/v1`` routes on ``engine``.

    Args:
        engine: the loaded model; its ``name`` is the only model id listed.
        auth: (user, password) required on every request, or None for none.
        defaults: settings for fields a request leaves unset (greedy, 256 new tokens when None).
    """
    defaults = defaults or GenerationSettings()
    router = APIRouter(prefix="/v1")
    waiting = anyio.CapacityLimiter(MAX_WAITING_THREADS)
    card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "qtune"}

    # the GET routes are async: they answer on the event loop and never wait for a worker thread
    @router.get("/models")
    async def models(request: Request):
        try:
            _check_auth(request, auth)
        except ApiError as e:
            return e.response()
        return {"object": "list", "data": [card]}

    @router.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        try:
            _check_auth(request, auth)
            if model_id != engine.name:
                raise ApiError(
                    404,
                    f"model {model_id!r} not found: this server serves {engine.name!r} only",
                    param="model",
                    code="model_not_found",
                )
        except ApiError as e:
            return e.response()
        return card

    for route in _GENERATION_ROUTES:
        router.post(route.path, name=route.name)(_generation_route(route, engine, auth, defaults, waiting))
    return router


@dataclass(frozen=True)
class _GenerationRoute:
    """One generation endpoint: its path and route name, its request model (what differs in validation), and
    the response's ``object`` and choice layout (:func:`qtune.serve.api.responses.respond`)."""

    path: str
    name: str
    request: type[SamplingRequest]
    obj: str
    choice: Callable[[str | None, str | None, bool], dict | None]
    dropped_header: bool
    """Whether the answer carries ``X-Qtune-Dropped-Turns`` (the conversation turns left out to fit)."""


_GENERATION_ROUTES = (
    _GenerationRoute("/chat/completions", "chat_completions", ChatRequest, "chat.completion", chat_choice, True),
    _GenerationRoute("/completions", "completions", CompletionRequest, "text_completion", completion_choice, False),
)


def _generation_route(
    route: _GenerationRoute,
    engine: Engine,
    auth: tuple[str, str] | None,
    defaults: GenerationSettings,
    waiting: anyio.CapacityLimiter,
) -> Callable[[Request], Awaitable[Response]]:
    """The handler of ``route``: check the credentials, prepare the request in a worker thread
    (:func:`qtune.serve.api.validation.prepare`), then answer it."""

    async def handler(request: Request) -> Response:
        try:
            _check_auth(request, auth)
            job = await anyio.to_thread.run_sync(prepare, route.request, engine, await read_body(request), defaults)
        except ApiError as e:
            return e.response()
        headers = {"X-Qtune-Dropped-Turns": str(job.dropped)} if route.dropped_header else {}
        return await respond(request, engine, job, waiting, obj=route.obj, choice=route.choice, headers=headers)

    return handler


def create_app(
    engine: Engine,
    auth: tuple[str, str] | None = None,
    defaults: GenerationSettings | None = None,
    concurrency: int = 1,
    ui: bool = True,
) -> FastAPI:
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

        from qtune.serve.web import CSS, JS, build_ui

        blocks = build_ui(engine, defaults or GenerationSettings())
        blocks.queue(default_concurrency_limit=concurrency)
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, footer_links=[], css=CSS, js=JS)
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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    Server(config).run()
