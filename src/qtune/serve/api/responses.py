"""Answering a prepared request (:func:`respond`): as one JSON body, or as server-sent events ending with
``data: [DONE]``; the engine's stream is consumed from the event loop a piece at a time in worker threads, and a
client that goes away, or a server that stops, cancels the generation at its next token."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qtune.serve.api.fields import ApiError
from qtune.serve.api.validation import Prepared
from qtune.serve.engine import Engine, GenerationSettings, StreamState


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

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        settings: GenerationSettings,
        state: StreamState,
        limiter: anyio.CapacityLimiter,
    ):
        self.cancel, self._limiter = threading.Event(), limiter
        self._stream = engine.stream(prompt_ids, settings, state, self.cancel)
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


def _usage(state: StreamState) -> dict:
    """OpenAI's usage object: tokens of the prompt sent to the model and tokens generated (EOS included)."""
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "total_tokens": state.prompt_tokens + state.completion_tokens,
    }


async def _whole_text(request: Request, pieces: _Pieces, state: StreamState) -> str:
    """The whole answer; generation is cancelled when the client goes away.

    Raises:
        ApiError: 503 when the generation was cancelled (client gone, server shutting down).
    """
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
        raise ApiError(503, message, type="server_error", code="cancelled")
    return "".join(text)


async def respond(
    request: Request,
    engine: Engine,
    job: Prepared,
    limiter: anyio.CapacityLimiter,
    *,
    obj: str,
    choice: Callable[[str | None, str | None, bool], dict | None],
    headers: dict,
) -> Response:
    """Run one prepared request and answer it as JSON or as server-sent events.

    Args:
        obj: the response's ``object`` (``chat.completion`` or ``text_completion``; chunks add ``.chunk`` for
            chat).
        choice: (text, finish_reason, streamed) -> the one choice of the body or of a chunk; text None is the
            opening chunk of a stream (no text yet), None when the stream has no opening chunk.
    """
    cid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created, state = int(time.time()), StreamState()
    pieces = _Pieces(engine, job.prompt_ids, job.settings, state, limiter)
    head = {"id": cid, "object": obj, "created": created, "model": engine.name}

    if not job.stream:
        try:
            text = await _whole_text(request, pieces, state)
        except ApiError as e:
            return e.response()
        return JSONResponse(
            {**head, "choices": [choice(job.echo + text, state.finish_reason, False)], "usage": _usage(state)},
            headers=headers,
        )

    head["object"] = f"{obj}.chunk" if obj.startswith("chat") else obj

    def event(choices: list[dict | None], usage: dict | None = None) -> str:
        data = {**head, "choices": choices}
        if job.include_usage:  # OpenAI's layout: null in every chunk but the last
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            opening = choice(None, None, True)
            if opening is not None:
                yield event([opening])
            if job.echo:
                yield event([choice(job.echo, None, True)])
            while (piece := await pieces.next()) is not None:
                yield event([choice(piece, None, True)])
        finally:
            await pieces.close()
        if state.cancelled:
            error = {"message": SHUTTING_DOWN, "type": "server_error", "param": None, "code": "cancelled"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield event([choice("", state.finish_reason, True)])
        if job.include_usage:
            yield event([], _usage(state))
        yield "data: [DONE]\n\n"

    return _CancellingStream(events(), pieces.cancel, media_type="text/event-stream", headers=headers)


def chat_choice(text: str | None, finish: str | None, streamed: bool) -> dict:
    if not streamed:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    if text is None:
        delta = {"role": "assistant", "content": ""}
    else:
        delta = {"content": text} if finish is None else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def completion_choice(text: str | None, finish: str | None, streamed: bool) -> dict | None:
    if text is None:
        return None  # a completion stream has no opening chunk
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
