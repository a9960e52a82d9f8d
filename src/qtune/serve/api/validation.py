"""Validation of the two generation requests, one path for both (:func:`prepare`): the body's fields
(:mod:`qtune.serve.api.fields`), their types and ranges (the pydantic request models), the conversation or prompt
text, the decoding settings, then tokenization within the context budget. What differs between chat and
completions is the request model and its content (:class:`Conversation`, :class:`PromptText`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qtune.data.templates import Message
from qtune.serve.api.body import load
from qtune.serve.api.fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MESSAGE_FIELDS,
    ROLES,
    STREAM_OPTIONS,
    TEXT_PART,
    ApiError,
    RequestFields,
    bad_request,
    check_fields,
    check_text,
    json_type,
)
from qtune.serve.engine import Engine, GenerationSettings, SettingsError
from qtune.serve.session import ContextOverflow, fit_messages

MAX_MESSAGES = 4096
"""Most messages in one request, answered 400 beyond: bounds validation before the conversation is fitted."""


class SamplingRequest(BaseModel):
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
    FIELDS: ClassVar[RequestFields]
    """How the endpoint treats each field of its body."""

    def max_new_tokens(self) -> int | None:
        """The request's limit on generated tokens (None: the server's default)."""
        return self.max_tokens

    def content(self) -> Conversation | PromptText:
        """What the request asks the model to continue, checked (:class:`ApiError` 400 naming the part)."""
        raise NotImplementedError


class ChatRequest(SamplingRequest):
    """A chat-completion request (:data:`CHAT_FIELDS`); ``messages`` are checked by :func:`messages`."""

    messages: list[Any] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, gt=0)
    FIELDS: ClassVar[RequestFields] = CHAT_FIELDS

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def content(self) -> Conversation:
        return Conversation(messages(self.messages))


class CompletionRequest(SamplingRequest):
    """A completion request (:data:`COMPLETION_FIELDS`); ``prompt`` is checked by :func:`_prompt`."""

    prompt: Any
    echo: bool | None = None
    FIELDS: ClassVar[RequestFields] = COMPLETION_FIELDS

    def content(self) -> PromptText:
        return PromptText(_prompt(self.prompt), bool(self.echo))


def _validate(cls: type[SamplingRequest], body: dict, fields: RequestFields) -> SamplingRequest:
    """``body`` as a ``cls``: fields checked against ``fields``, then types and ranges (400 naming the field)."""
    body = check_fields(body, fields)
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        raise bad_request(where, err["msg"]) from None


def messages(items: list) -> list[Message]:
    """The request's messages as ``{"role", "content"}`` with ``developer`` read as ``system``.

    Raises:
        ApiError: 400 naming the message by its index in the request (``messages[1]: ...``): a field or role
            qtune does not take, content that is not text, or an order the templates cannot render.
    """
    out = [_message(i, m) for i, m in enumerate(items)]
    _check_order(out)
    return out


def _message(i: int, m: Any) -> Message:
    """Message ``i`` of the request, its role and fields checked and its content joined into one text."""
    at = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(at, f"expected an object with role and content, got {json_type(m)}")
    role = m.get("role")
    if "role" not in m:
        raise bad_request(f"{at}.role", "required")
    if role in ("tool", "function"):
        raise bad_request(
            f"{at}.role",
            f"{role!r} messages are not supported (qtune has no tool calling); "
            "expected 'system', 'developer', 'user' or 'assistant'",
        )
    if role not in ROLES:
        raise bad_request(
            f"{at}.role", f"expected 'system', 'developer', 'user' or 'assistant', got {json.dumps(role)}"
        )
    m = check_fields(m, MESSAGE_FIELDS, f"{at}.")
    if "content" not in m:
        raise bad_request(f"{at}.content", "required")
    return {"role": "system" if role == "developer" else role, "content": _content_text(m["content"], at)}


def _content_text(content: Any, at: str) -> str:
    """A message's content (a string, or a list of text parts, joined); ``at`` names the message."""
    if isinstance(content, str):
        return check_text(content, f"{at}.content")
    if not isinstance(content, list):
        raise bad_request(f"{at}.content", f"expected a string or a list of text parts, got {json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(where, f'expected a text part {{"type": "text", "text": ...}}, got {json_type(part)}')
        if part.get("type") != "text":
            raise bad_request(
                f"{where}.type",
                f"only text parts are supported (qtune serves a text model), got {json.dumps(part.get('type'))}",
            )
        check_fields(part, TEXT_PART, f"{where}.")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text", f"expected a string, got {json_type(part.get('text'))}")
        texts.append(check_text(part["text"], f"{where}.text"))
    return "".join(texts)


def _check_order(out: list[Message]) -> None:
    """An optional system message first, then user and assistant alternating, ending with a user message."""
    start = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise bad_request(
                f"messages[{i}]",
                "a second system message; qtune takes one system (or developer) message, as the first message"
                if start
                else "a system (or developer) message must be the first message",
            )
        if m["role"] != expected:
            raise bad_request(
                f"messages[{i}].role",
                f"expected role {expected!r} (an optional system message first, "
                f"then user and assistant alternating), got {m['role']!r}",
            )
    if len(out) == start:
        raise bad_request("messages", "a conversation needs a user message after the system message")
    if out[-1]["role"] != "user":
        raise bad_request(
            f"messages[{len(out) - 1}].role", f"a conversation must end with a user message, got {out[-1]['role']!r}"
        )


def _prompt(value) -> str:
    """The one prompt text of a completion request.

    Raises:
        ApiError: 400 unless ``value`` is a string or a list of one string.
    """
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return check_text(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(x, (int, list)) for x in value):
        raise bad_request("prompt", "token-id prompts are not supported; send the prompt as text")
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        raise bad_request("prompt", f"qtune completes one prompt per request, got {len(value)}; send one string")
    raise bad_request("prompt", f"expected a string, got {json_type(value)}")


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (check_text(value, "stop"),)
    if not isinstance(value, list):
        raise bad_request("stop", f"expected a string or a list of strings, got {json_type(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise bad_request(f"stop[{i}]", f"expected a string, got {json_type(s)}")
        check_text(s, f"stop[{i}]")
    return tuple(value)


def _settings_error(e: SettingsError) -> ApiError:
    return ApiError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(e.field, e.field))


def _settings(
    req: SamplingRequest, max_tokens: int | None, defaults: GenerationSettings
) -> tuple[GenerationSettings, bool]:
    """The decoding settings of a request, and whether its stream ends with a usage event.

    Raises:
        ApiError: 400 for settings out of range, ``stream_options`` without ``stream`` or ``seed`` with sampling.
    """
    include_usage = False
    if req.stream_options is not None:
        if not req.stream:
            raise bad_request("stream_options", "only allowed with stream: true")
        if not isinstance(req.stream_options, dict):
            raise bad_request("stream_options", f"expected an object, got {json_type(req.stream_options)}")
        options = check_fields(req.stream_options, STREAM_OPTIONS, "stream_options.")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad_request("stream_options.include_usage", f"expected a boolean, got {json_type(include_usage)}")
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
        raise bad_request(
            "seed",
            "not supported with sampling (temperature > 0): qtune cannot make sampled answers "
            "reproducible; leave it out, or use temperature 0 (greedy: the same answer every time)",
            code="unsupported_parameter",
        )
    return settings, include_usage


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    dropped: int = 0
    echo: str = ""


@dataclass
class Tokenized:
    """A request's prompt as the engine takes it: its ids, the conversation turns left out to fit, and the text
    echoed before the answer."""

    prompt_ids: list[int]
    dropped: int = 0
    echo: str = ""


@dataclass
class Conversation:
    """The checked messages of a chat request."""

    messages: list[Message]

    def tokenize(self, engine: Engine, settings: GenerationSettings) -> Tokenized:
        """The conversation fitted into the context (:func:`qtune.serve.session.fit_messages`).

        Raises:
            ApiError: 400 when the newest message does not fit or the template cannot render the conversation.
            SettingsError: ``max_new_tokens`` leaves no room for a prompt.
        """
        try:
            fitted = fit_messages(engine, self.messages, settings)
        except ContextOverflow as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except SettingsError:
            raise
        except ValueError as e:  # the template cannot render the conversation
            raise ApiError(400, str(e), param="messages") from None
        return Tokenized(fitted.prompt_ids, dropped=fitted.dropped)


@dataclass
class PromptText:
    """The checked prompt of a completion request, and whether the answer echoes it."""

    text: str
    echo: bool

    def tokenize(self, engine: Engine, settings: GenerationSettings) -> Tokenized:
        """The prompt's ids, as training tokenized prompts (:meth:`Engine.encode`).

        Raises:
            ApiError: 400 when the prompt is empty or does not fit (refused without tokenizing when it is far
                too long).
            SettingsError: ``max_new_tokens`` leaves no room for a prompt.
        """
        prompt = self.text
        budget = engine.prompt_budget(settings)

        def overflow(tokens: str) -> ApiError:
            return bad_request(
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
            raise bad_request("prompt", "empty: send some text to continue")
        return Tokenized(ids, echo=prompt if self.echo else "")


def prepare(request_type: type[SamplingRequest], engine: Engine, raw: bytes, defaults: GenerationSettings) -> Prepared:
    """Parse, validate and tokenize one request of ``request_type`` (:class:`ChatRequest` or
    :class:`CompletionRequest`); runs in a worker thread, as it tokenizes.

    Checks run in this order, the first failing one answering: the JSON body, its fields
    (``request_type.FIELDS``), their types and ranges, the conversation or prompt, the decoding settings, the fit
    in the context.

    Raises:
        ApiError: 400 naming what is wrong (``param``).
    """
    req = _validate(request_type, load(raw), request_type.FIELDS)
    content = req.content()
    settings, include_usage = _settings(req, req.max_new_tokens(), defaults)
    try:
        tokenized = content.tokenize(engine, settings)
    except SettingsError as e:
        raise _settings_error(e) from None
    return Prepared(
        tokenized.prompt_ids,
        settings,
        bool(req.stream),
        include_usage,
        dropped=tokenized.dropped,
        echo=tokenized.echo,
    )
