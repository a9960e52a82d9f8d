"""OpenAI-compatible HTTP API on the engine, and the server that also carries the web app.

Routes, following OpenAI's API so that the official ``openai`` Python client works against them:

- ``GET /v1/models`` (the one model served) and ``GET /v1/models/{id}`` (404 ``model_not_found`` for any other
  id);
- ``POST /v1/chat/completions``: a conversation, fitted into the context by
  :func:`qtune.serve.session.fit_messages` (the number of turns left out is returned in the
  ``X-Qtune-Dropped-Turns`` header);
- ``POST /v1/completions``: raw prompt text, tokenized exactly as training tokenized prompts
  (:meth:`Engine.encode`) and continued by the same engine.

Both generation routes answer as plain JSON, or as server-sent events with ``"stream": true``; with
``"stream_options": {"include_usage": true}`` the last event before ``[DONE]`` carries ``usage`` and no choices.
``usage`` is exact: the tokens of the prompt sent to the model and the tokens generated.

Every request field is one of three kinds (:data:`CHAT_FIELDS`, :data:`COMPLETION_FIELDS`): supported, accepted
and ignored (fields that cannot change the answer, such as ``user``), or rejected with a 400 naming it in
``param`` unless its value asks for nothing (``n: 1``, ``tools: []``, ...); a field OpenAI does not define is a 400
too, as OpenAI answers it. Bad requests (malformed JSON, missing or out-of-range fields, a conversation that does
not fit) get status 400 and an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``; messages
are named by their index in the request (``messages[1].content``). With ``auth`` set, requests need
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
  ``MAX_STOP_CHARS``), else 400; ``max_tokens`` must leave room for the prompt in the context, else 400; a
  completion prompt far too long for the context is refused without tokenizing it.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Mount

from qtune.data.templates import Message
from qtune.serve.engine import MAX_STOP_CHARS, MAX_STOP_STRINGS, Engine, GenerationSettings, SettingsError, StreamState
from qtune.serve.session import ContextOverflow, fit_messages
from qtune.units import MIB

MAX_BODY_BYTES = MIB
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


# ---- which request fields qtune honours ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestFields:
    """How one object of a request (the body, a message, ``stream_options``) treats each field.

    Attributes:
        supported: field -> what qtune does with it.
        ignored: fields accepted and without effect on the answer.
        rejected: field -> (values accepted because they ask for nothing, what qtune does not do); any other
            value is a 400 with ``param`` set to the field. Fields in none of the three are a 400 as well
            ("unrecognized request argument", as OpenAI answers them).
    """

    supported: dict[str, str]
    ignored: tuple[str, ...] = ()
    rejected: dict[str, tuple[tuple, str]] | None = None


_SAMPLING = {
    "model": "accepted with any value: the server serves one model (its id is GET /v1/models)",
    "max_tokens": "most tokens to generate, at least 1 and leaving room for the prompt in the context",
    "temperature": "0 to 2; 0 is greedy (unset: the server's default, greedy unless `qtune serve --temperature`)",
    "top_p": "nucleus sampling, (0, 1]",
    "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters; the "
    "answer ends before the first",
    "stream": "true: server-sent events, ending with `data: [DONE]`",
    "stream_options": "only with stream; `include_usage: true` adds a last event with `usage` and `choices: []` "
    "(`include_obfuscation` is ignored)",
    "seed": "accepted when decoding is greedy (the answer is then always the same); 400 with temperature > 0, "
    "as sampled answers cannot be made reproducible",
    "repetition_penalty": "qtune's own: (0, 10], 1 is none",
}
_PENALTIES = {
    "frequency_penalty": ((None, 0), "frequency penalty; qtune has repetition_penalty"),
    "logit_bias": ((None, {}), "logit bias"),
    "n": ((None, 1), "one choice per request"),
    "presence_penalty": ((None, 0), "presence penalty; qtune has repetition_penalty"),
}

CHAT_FIELDS = RequestFields(
    supported={
        "messages": "an optional system (or developer) message first, then user and assistant messages "
        "alternating, ending with a user message; content is a string or a list of text parts",
        "max_completion_tokens": "as max_tokens (wins over it)",
        **_SAMPLING,
    },
    ignored=(
        "metadata",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
        "store",
        "user",
    ),
    rejected={
        **_PENALTIES,
        "audio": ((None,), "audio output"),
        "function_call": ((None, "none"), "function calling"),
        "functions": ((None, []), "function calling"),
        "logprobs": ((None, False), "log probabilities"),
        "modalities": ((None, ["text"]), "output other than text"),
        "moderation": ((None,), "moderation"),
        "parallel_tool_calls": ((None,), "tool calling"),
        "prediction": ((None,), "predicted outputs"),
        "reasoning_effort": ((None,), "reasoning effort"),
        "response_format": ((None, {"type": "text"}), "structured output: JSON mode, JSON schema"),
        "tool_choice": ((None, "none"), "tool calling"),
        "tools": ((None, []), "tool calling"),
        "top_logprobs": ((None, 0), "log probabilities"),
        "verbosity": ((None,), "verbosity"),
        "web_search_options": ((None,), "web search"),
    },
)
"""``POST /v1/chat/completions``: the fields of OpenAI's chat-completion request, as qtune treats them."""

COMPLETION_FIELDS = RequestFields(
    supported={
        "prompt": "one text (a string, or a list of one string), tokenized as training tokenized prompts "
        "and continued as it is (no template added)",
        "echo": "true: the prompt text, then the completion",
        **_SAMPLING,
    },
    ignored=("user",),
    rejected={
        **_PENALTIES,
        "best_of": ((None, 1), "one candidate per request"),
        "logprobs": ((None,), "log probabilities"),
        "suffix": ((None, ""), "insertion: text after the completion"),
    },
)
"""``POST /v1/completions``: the fields of OpenAI's (legacy) completion request, as qtune treats them."""

MESSAGE_FIELDS = RequestFields(
    supported={
        "role": "system, developer (the same as system), user or assistant",
        "content": 'a string, or a list of `{"type": "text", "text": ...}` parts (joined)',
    },
    rejected={
        "name": ((None,), "participant names"),
        "tool_calls": ((None, []), "tool calling"),
        "tool_call_id": ((None,), "tool calling"),
        "function_call": ((None,), "function calling"),
        "refusal": ((None,), "refusals"),
        "audio": ((None,), "audio"),
    },
)
"""One entry of ``messages``."""

_TEXT_PART = RequestFields(supported={"type": "text", "text": "the text"})
_STREAM_OPTIONS = RequestFields(
    supported={"include_usage": "true: a last event with usage"}, ignored=("include_obfuscation",)
)
ROLES = ("system", "developer", "user", "assistant")


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _bad(param: str, message: str, code: str | None = None) -> _ApiError:
    """A 400 whose message starts with the parameter it is about."""
    return _ApiError(400, f"{param}: {message}", param=param, code=code)


def _json_type(value) -> str:
    for types, name in (
        (type(None), "null"),
        (bool, "a boolean"),
        ((int, float), "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _same(value, accepted) -> bool:
    """JSON equality that tells booleans from numbers (``1 != true``)."""
    if isinstance(value, bool) or isinstance(accepted, bool) or value is None or accepted is None:
        return value is accepted
    if isinstance(value, (int, float)) and isinstance(accepted, (int, float)):
        return value == accepted
    return type(value) is type(accepted) and value == accepted


def _check_fields(obj: dict, fields: RequestFields, prefix: str = "") -> dict:
    """``obj`` less its ignored fields and the rejected fields whose values ask for nothing.

    Raises:
        _ApiError: 400 for a field not recognized or a rejected field asking for something (``param`` names it,
            with ``prefix``, e.g. ``messages[2].``).
    """
    rejected = fields.rejected or {}
    kept = {}
    for key, value in obj.items():
        if key in fields.supported:
            kept[key] = value
        elif key in rejected:
            accepted, what = rejected[key]
            if not any(_same(value, a) for a in accepted):
                send = " or ".join(json.dumps(a) for a in accepted if a is not None)
                raise _bad(
                    f"{prefix}{key}",
                    f"not supported by qtune ({what}); leave it out" + (f" or send {send}" if send else ""),
                    code="unsupported_parameter",
                )
        elif key not in fields.ignored:
            known = ", ".join(sorted([*fields.supported, *fields.ignored]))
            raise _bad(
                f"{prefix}{key}", f"unrecognized request argument (qtune accepts {known})", code="unknown_parameter"
            )
    return kept


def _check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(param, "not valid Unicode (a lone surrogate escape)") from None
    return text


class _Sampling(BaseModel):
    """Type and range checks of the scalar fields both endpoints share (the rest is checked by hand, to name
    message indices and fields exactly)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: Any = None
    stream: bool | None = None
    stream_options: Any = None
    seed: int | None = None


class ChatRequest(_Sampling):
    """A chat-completion request (:data:`CHAT_FIELDS`); ``messages`` are checked by :func:`_messages`."""

    messages: list[Any] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, gt=0)


class CompletionRequest(_Sampling):
    """A completion request (:data:`COMPLETION_FIELDS`); ``prompt`` is checked by :func:`_prompt`."""

    prompt: Any
    echo: bool | None = None


def _validate(cls: type[BaseModel], body: dict, fields: RequestFields):
    body = _check_fields(body, fields)
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        raise _bad(where, err["msg"]) from None


def _messages(items: list) -> list[Message]:
    """The request's messages as ``{"role", "content"}`` with ``developer`` read as ``system``.

    Raises:
        _ApiError: 400 naming the message by its index in the request (``messages[1]: ...``): a field or role
            qtune does not take, content that is not text, or an order the templates cannot render.
    """
    out: list[Message] = []
    for i, m in enumerate(items):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(at, f"expected an object with role and content, got {_json_type(m)}")
        role = m.get("role")
        if "role" not in m:
            raise _bad(f"{at}.role", "required")
        if role in ("tool", "function"):
            raise _bad(
                f"{at}.role",
                f"{role!r} messages are not supported (qtune has no tool calling); "
                "expected 'system', 'developer', 'user' or 'assistant'",
            )
        if role not in ROLES:
            raise _bad(f"{at}.role", f"expected 'system', 'developer', 'user' or 'assistant', got {json.dumps(role)}")
        m = _check_fields(m, MESSAGE_FIELDS, f"{at}.")
        if "content" not in m:
            raise _bad(f"{at}.content", "required")
        content = m["content"]
        if isinstance(content, str):
            text = _check_text(content, f"{at}.content")
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"{at}.content[{j}]"
                if not isinstance(part, dict):
                    raise _bad(where, f'expected a text part {{"type": "text", "text": ...}}, got {_json_type(part)}')
                if part.get("type") != "text":
                    raise _bad(
                        f"{where}.type",
                        f"only text parts are supported (qtune serves a text model), got "
                        f"{json.dumps(part.get('type'))}",
                    )
                _check_fields(part, _TEXT_PART, f"{where}.")
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.text", f"expected a string, got {_json_type(part.get('text'))}")
                texts.append(_check_text(part["text"], f"{where}.text"))
            text = "".join(texts)
        else:
            raise _bad(f"{at}.content", f"expected a string or a list of text parts, got {_json_type(content)}")
        out.append({"role": "system" if role == "developer" else role, "content": text})

    start = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise _bad(
                f"messages[{i}]",
                "a second system message; qtune takes one system (or developer) message, as the first message"
                if start
                else "a system (or developer) message must be the first message",
            )
        if m["role"] != expected:
            raise _bad(
                f"messages[{i}].role",
                f"expected role {expected!r} (an optional system message first, "
                f"then user and assistant alternating), got {m['role']!r}",
            )
    if len(out) == start:
        raise _bad("messages", "a conversation needs a user message after the system message")
    if out[-1]["role"] != "user":
        raise _bad(
            f"messages[{len(out) - 1}].role", f"a conversation must end with a user message, got {out[-1]['role']!r}"
        )
    return out


def _prompt(value) -> str:
    """The one prompt text of a completion request.

    Raises:
        _ApiError: 400 unless ``value`` is a string or a list of one string.
    """
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return _check_text(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(x, (int, list)) for x in value):
        raise _bad("prompt", "token-id prompts are not supported; send the prompt as text")
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        raise _bad("prompt", f"qtune completes one prompt per request, got {len(value)}; send one string")
    raise _bad("prompt", f"expected a string, got {_json_type(value)}")


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_check_text(value, "stop"),)
    if not isinstance(value, list):
        raise _bad("stop", f"expected a string or a list of strings, got {_json_type(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise _bad(f"stop[{i}]", f"expected a string, got {_json_type(s)}")
        _check_text(s, f"stop[{i}]")
    return tuple(value)


def _settings_error(e: SettingsError) -> _ApiError:
    return _ApiError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(e.field, e.field))


def _settings(req: _Sampling, max_tokens: int | None, defaults: GenerationSettings) -> tuple[GenerationSettings, bool]:
    """The decoding settings of a request, and whether its stream ends with a usage event.

    Raises:
        _ApiError: 400 for settings out of range, ``stream_options`` without ``stream`` or ``seed`` with sampling.
    """
    include_usage = False
    if req.stream_options is not None:
        if not req.stream:
            raise _bad("stream_options", "only allowed with stream: true")
        if not isinstance(req.stream_options, dict):
            raise _bad("stream_options", f"expected an object, got {_json_type(req.stream_options)}")
        options = _check_fields(req.stream_options, _STREAM_OPTIONS, "stream_options.")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", f"expected a boolean, got {_json_type(include_usage)}")
    try:
        settings = GenerationSettings(
            max_new_tokens=max_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            repetition_penalty=(
                defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
            ),
            stop=tuple(defaults.stop) + _stop(req.stop),
        )
    except SettingsError as e:
        raise _settings_error(e) from None
    if req.seed is not None and settings.temperature > 0:
        raise _bad(
            "seed",
            "not supported with sampling (temperature > 0): qtune cannot make sampled answers "
            "reproducible; leave it out, or use temperature 0 (greedy: the same answer every time)",
            code="unsupported_parameter",
        )
    return settings, include_usage


async def _read_body(request: Request) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``MAX_BODY_BYTES``."""
    too_large = _ApiError(
        413, f"request body over {MAX_BODY_BYTES} bytes; send a shorter conversation", code="request_too_large"
    )
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


def _load(raw: bytes) -> dict:
    """The parsed body (runs in a worker thread).

    Raises:
        _ApiError: 400 for malformed or too deeply nested JSON, or a body that is not an object.
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
    return body


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    dropped: int = 0
    echo: str = ""


def _prepare_chat(engine: Engine, raw: bytes, defaults: GenerationSettings) -> _Prepared:
    """Parse, validate and fit one chat request (runs in a worker thread: it tokenizes)."""
    req = _validate(ChatRequest, _load(raw), CHAT_FIELDS)
    messages = _messages(req.messages)
    settings, include_usage = _settings(req, req.max_completion_tokens or req.max_tokens, defaults)
    try:
        fitted = fit_messages(engine, messages, settings)
    except ContextOverflow as e:
        raise _ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
    except SettingsError as e:
        raise _settings_error(e) from None
    except ValueError as e:  # the template cannot render the conversation
        raise _ApiError(400, str(e), param="messages") from None
    return _Prepared(fitted.prompt_ids, settings, bool(req.stream), include_usage, dropped=fitted.dropped)


def _prepare_completion(engine: Engine, raw: bytes, defaults: GenerationSettings) -> _Prepared:
    """Parse, validate and tokenize one completion request (runs in a worker thread)."""
    req = _validate(CompletionRequest, _load(raw), COMPLETION_FIELDS)
    prompt = _prompt(req.prompt)
    settings, include_usage = _settings(req, req.max_tokens, defaults)
    try:
        budget = engine.prompt_budget(settings)
    except SettingsError as e:
        raise _settings_error(e) from None

    def overflow(tokens: str) -> _ApiError:
        return _bad(
            "prompt",
            f"{tokens} tokens, but at most {budget} fit (context {engine.context_length} tokens "
            f"less max_tokens {settings.max_new_tokens}); shorten it or lower max_tokens",
            code="context_length_exceeded",
        )

    if len(prompt) > budget * engine.max_token_chars:  # so long that it cannot fit: not worth tokenizing
        raise overflow(f"at least {len(prompt) // engine.max_token_chars}")
    ids = engine.encode(prompt)
    if len(ids) > budget:
        raise overflow(str(len(ids)))
    if not ids:
        raise _bad("prompt", "empty: send some text to continue")
    return _Prepared(ids, settings, bool(req.stream), include_usage, echo=prompt if req.echo else "")


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
        _ApiError: 503 when the generation was cancelled (client gone, server shutting down).
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
        raise _ApiError(503, message, type="server_error", code="cancelled")
    return "".join(text)


async def _respond(
    request: Request,
    engine: Engine,
    job: _Prepared,
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
        except _ApiError as e:
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


def _chat_choice(text: str | None, finish: str | None, streamed: bool) -> dict:
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


def _completion_choice(text: str | None, finish: str | None, streamed: bool) -> dict | None:
    if text is None:
        return None  # a completion stream has no opening chunk
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


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
        raise _ApiError(
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
        except _ApiError as e:
            return e.response()
        return {"object": "list", "data": [card]}

    @router.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        try:
            _check_auth(request, auth)
            if model_id != engine.name:
                raise _ApiError(
                    404,
                    f"model {model_id!r} not found: this server serves {engine.name!r} only",
                    param="model",
                    code="model_not_found",
                )
        except _ApiError as e:
            return e.response()
        return card

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            _check_auth(request, auth)
            job = await anyio.to_thread.run_sync(_prepare_chat, engine, await _read_body(request), defaults)
        except _ApiError as e:
            return e.response()
        return await _respond(
            request,
            engine,
            job,
            waiting,
            obj="chat.completion",
            choice=_chat_choice,
            headers={"X-Qtune-Dropped-Turns": str(job.dropped)},
        )

    @router.post("/completions")
    async def completions(request: Request):
        try:
            _check_auth(request, auth)
            job = await anyio.to_thread.run_sync(_prepare_completion, engine, await _read_body(request), defaults)
        except _ApiError as e:
            return e.response()
        return await _respond(
            request, engine, job, waiting, obj="text_completion", choice=_completion_choice, headers={}
        )

    return router


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
