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

Modules: :mod:`~qtune.serve.api.fields` (which fields qtune honours; OpenAI-style errors),
:mod:`~qtune.serve.api.body` (reading and parsing a body within its bounds), :mod:`~qtune.serve.api.validation`
(one validation path for both generation requests), :mod:`~qtune.serve.api.responses` (JSON or server-sent events;
cancellation) and :mod:`~qtune.serve.api.server` (routes, app, uvicorn); this package re-exports their public
names.
"""

from qtune.serve.api.body import MAX_BODY_BYTES, MAX_JSON_DEPTH
from qtune.serve.api.fields import CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, ROLES, RequestFields
from qtune.serve.api.responses import SHUTTING_DOWN
from qtune.serve.api.server import MAX_WAITING_THREADS, SHUTDOWN_GRACE_S, api_router, create_app, run_server
from qtune.serve.api.validation import MAX_MESSAGES, ChatRequest, CompletionRequest

__all__ = [
    "CHAT_FIELDS",
    "COMPLETION_FIELDS",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGES",
    "MAX_WAITING_THREADS",
    "MESSAGE_FIELDS",
    "ROLES",
    "SHUTDOWN_GRACE_S",
    "SHUTTING_DOWN",
    "ChatRequest",
    "CompletionRequest",
    "RequestFields",
    "api_router",
    "create_app",
    "run_server",
]
