"""Reading and parsing a request body, with the bounds that hold before anything else is done with it: at most
``MAX_BODY_BYTES`` read (413 beyond, before the body is read to the end), at most ``MAX_JSON_DEPTH`` levels of
nesting (400 beyond, also when Python's parser would recurse too deep)."""

from __future__ import annotations

import json

from fastapi import Request

from qtune.serve.api.fields import ApiError
from qtune.units import MIB

MAX_BODY_BYTES = MIB
"""Largest request body (1 MiB), answered 413 beyond: bounds reading, parsing and tokenizing one request."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of the JSON body (a chat request needs 5 levels), answered 400 beyond."""


async def read_body(request: Request) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``MAX_BODY_BYTES``."""
    too_large = ApiError(
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


def json_depth(value) -> int:
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


def load(raw: bytes) -> dict:
    """The parsed body (runs in a worker thread).

    Raises:
        ApiError: 400 for malformed or too deeply nested JSON, or a body that is not an object.
    """
    too_deep = ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw)
    except ValueError as e:  # also UnicodeDecodeError, and integers too long to convert
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise too_deep from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body
