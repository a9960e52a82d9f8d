"""The one generation path: the engine behind ``qtune generate``, ``qtune chat``, the web app, the API and HumanEval.

It loads base + adapter from a run directory (or a merged model written by ``qtune export --merged``; or wraps a
model already loaded, :meth:`Engine.from_model`), renders conversations with exactly the template the adapter was
trained with (:func:`qtune.data.templates.format_conversation`, tokenized by :func:`qtune.data.tokenize.encode_prompt`
as in training), and generates with transformers' ``generate``: greedy or sampled, one prompt streamed through
``TextIteratorStreamer`` (:meth:`Engine.stream`) or several left-padded in batches (:meth:`Engine.generate_batch`).
Generation is serialized by a lock, so front ends may call it from several threads.

Where an answer ends (:class:`AnswerEnd`, the same rule for streamed and batched answers): at EOS, at
``max_new_tokens``, before the first stop string (the template's own and the request's), and, for the alpaca
template, at the start of the first line of its section-header form (``### Label:`` alone on a line,
:data:`qtune.data.templates.ALPACA_HEADER`), which a model writes when it runs on past its answer. Generation stops
there (transformers stopping criteria: ``StopStringCriteria`` for the strings, :class:`HeaderStop` for header
lines) and the answer is cut before it; a streamed answer never shows text of a stop string or of a header line.

Generated text is returned exactly as decoded (leading indentation and trailing newlines included); the streamed
pieces of an answer always join to the non-streamed answer.

Every generation can be cancelled from another thread (``cancel`` event of :meth:`Engine.stream`, or
:meth:`Engine.close` for all of them): it stops at the next token and frees the engine. Per-request costs are
bounded before the engine is taken:

- ``MAX_STOP_STRINGS`` (4, as OpenAI allows) extra stop strings of at most ``MAX_STOP_CHARS`` (64) characters
  each: building transformers' stop-string criteria costs about 0.1 s per string on a 49k-token vocabulary, and
  the criteria are built before taking the engine's lock, never while holding it.
- ``max_new_tokens`` must leave room for a prompt in the context window (:meth:`Engine.prompt_budget`).
Modules: :mod:`~qtune.generate.settings` (decoding settings and what a generation reports),
:mod:`~qtune.generate.stops` (where an answer ends, and the stopping criteria), :mod:`~qtune.generate.engine`
(loading, prompts, the context budget, the lock), :mod:`~qtune.generate.streaming` (one prompt, streamed) and
:mod:`~qtune.generate.batching` (several prompts in batches); this package re-exports their public names.
"""

from qtune.generate.engine import LOCK_POLL_S, MERGED_META, Engine
from qtune.generate.settings import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    Completion,
    GenerationSettings,
    SettingsError,
    StreamState,
)
from qtune.generate.stops import HEADER_TAIL_TOKENS, AnswerEnd, HeaderStop
from qtune.generate.stops import _StopTrimmer as _StopTrimmer  # for the tests of stream trimming

__all__ = [
    "HEADER_TAIL_TOKENS",
    "LOCK_POLL_S",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "MERGED_META",
    "AnswerEnd",
    "Completion",
    "Engine",
    "GenerationSettings",
    "HeaderStop",
    "SettingsError",
    "StreamState",
]
