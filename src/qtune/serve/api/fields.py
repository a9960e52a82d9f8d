"""Which request fields qtune honours, and the checks every object of a request goes through.

:class:`RequestFields` tables (:data:`CHAT_FIELDS`, :data:`COMPLETION_FIELDS`, :data:`MESSAGE_FIELDS`) say for each
field whether it is supported, accepted and ignored, or rejected unless its value asks for nothing;
:func:`check_fields` applies one. Errors are :class:`ApiError`, answered as OpenAI answers them
(``{"error": {"message", "type", "param", "code"}}``); :func:`bad_request` is the 400 that names its field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from qtune.serve.engine import MAX_STOP_CHARS, MAX_STOP_STRINGS


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

TEXT_PART = RequestFields(supported={"type": "text", "text": "the text"})
STREAM_OPTIONS = RequestFields(
    supported={"include_usage": "true: a last event with usage"}, ignored=("include_obfuscation",)
)
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered with status ``status`` and OpenAI's error body (:meth:`response`)."""

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


def bad_request(param: str, message: str, code: str | None = None) -> ApiError:
    """A 400 whose message starts with the parameter it is about."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def json_type(value) -> str:
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


def check_fields(obj: dict, fields: RequestFields, prefix: str = "") -> dict:
    """``obj`` less its ignored fields and the rejected fields whose values ask for nothing.

    Raises:
        ApiError: 400 for a field not recognized or a rejected field asking for something (``param`` names it,
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
                raise bad_request(
                    f"{prefix}{key}",
                    f"not supported by qtune ({what}); leave it out" + (f" or send {send}" if send else ""),
                    code="unsupported_parameter",
                )
        elif key not in fields.ignored:
            known = ", ".join(sorted([*fields.supported, *fields.ignored]))
            raise bad_request(
                f"{prefix}{key}", f"unrecognized request argument (qtune accepts {known})", code="unknown_parameter"
            )
    return kept


def check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(param, "not valid Unicode (a lone surrogate escape)") from None
    return text
