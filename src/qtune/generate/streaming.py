"""One prompt's answer, streamed (:meth:`qtune.generate.Engine.stream`): ``generate`` runs in its own thread
and feeds a ``TextIteratorStreamer``; the consumer's thread trims what the answer's end cuts off
(:class:`qtune.generate.stops._StopTrimmer`), tells the generation to stop once the answer has ended or the stream
was cancelled, and fills in the :class:`qtune.generate.settings.StreamState`."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
from transformers import TextIteratorStreamer

from qtune.generate.settings import GenerationSettings, StreamState
from qtune.generate.stops import AnswerEnd, _Cancelled, _StopTrimmer

if TYPE_CHECKING:
    from qtune.generate.engine import Engine


def stream_answer(
    engine: Engine,
    prompt_ids: list[int],
    settings: GenerationSettings | None = None,
    state: StreamState | None = None,
    cancel: threading.Event | None = None,
) -> Generator[str, None, None]:
    """:meth:`Engine.stream <qtune.generate.Engine.stream>` (its arguments, pieces and errors)."""
    s = settings or GenerationSettings()
    state = state if state is not None else StreamState()
    engine._check_fits(prompt_ids, s)
    end = engine.answer_end(s)
    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = cancel if cancel is not None else threading.Event()
    ended = threading.Event()  # the answer has ended (seen in the streamed text): stop at the next token
    engine._track(cancel)
    ids = torch.tensor([prompt_ids], device=engine.device)
    result: dict = {}
    thread = threading.Thread(
        target=_generate, args=(engine, ids, s, end, streamer, (cancel, ended), result), daemon=True
    )
    thread.start()
    trimmer = _StopTrimmer(end)
    pieces: list[str] = []
    try:
        for piece in streamer:  # read to the end: the answer's end is decided on all the generated text
            text = trimmer.push(piece)
            if text:
                pieces.append(text)
                yield text
            if trimmer.stopped:
                ended.set()
        cancelled = cancel.is_set() and not trimmer.stopped
        tail = "" if cancelled else trimmer.flush()
        if tail:
            pieces.append(tail)
            yield tail
    finally:
        cancel.set()  # generate() stops at its next token; the streamer's queue is unbounded
        thread.join()
        engine._untrack(cancel)
    if "error" in result:
        raise result["error"]
    _record(engine, state, prompt_ids, s, result.get("out"), "".join(pieces), cancelled, trimmer.stopped)


def _generate(
    engine: Engine,
    ids: torch.Tensor,
    s: GenerationSettings,
    end: AnswerEnd,
    streamer: TextIteratorStreamer,
    events: tuple[threading.Event, threading.Event],
    result: dict,
) -> None:
    """The generation thread: take the engine (unless ``cancel`` is set first) and generate into ``streamer``;
    ``result`` gets ``out`` (the generated ids) or ``error`` (surfaced in the consumer's thread).

    Args:
        ids: the prompt's ids, [1, prompt tokens].
        events: (cancel, ended): either stops generation at its next token.
    """
    cancel, ended = events
    try:  # criteria prepared before taking the lock
        criteria = [_Cancelled(cancel), _Cancelled(ended), *engine._stopping_criteria(end, ids.shape[1])]
        if not engine._acquire(cancel):
            streamer.end()
            return
        try:
            with torch.no_grad():
                result["out"] = engine.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=criteria,
                    **engine._generate_kwargs(s),
                )
        finally:
            engine._release()
    except Exception as e:  # surfaced in the consumer's thread
        result["error"] = e
        streamer.end()


def _record(
    engine: Engine,
    state: StreamState,
    prompt_ids: list[int],
    s: GenerationSettings,
    out: torch.Tensor | None,
    text: str,
    cancelled: bool,
    stopped: bool,
) -> None:
    """Fill in ``state`` once the stream has ended.

    Args:
        out: the ids ``generate`` returned (prompt included), None when it never started (cancelled first).
        text: the answer as streamed.
        cancelled: the stream was cancelled before the answer ended in its text.
        stopped: the answer ended at a stop string or a header line.
    """
    state.prompt_tokens = len(prompt_ids)
    state.text = text
    if out is None:  # cancelled before generation started
        state.cancelled, state.completion_tokens, state.finish_reason = True, 0, "stop"
        return
    new = out[0, len(prompt_ids) :].tolist()
    state.completion_tokens = len(new)
    stopped = stopped or bool(new and new[-1] == engine.tokenizer.eos_token_id)
    state.cancelled = cancelled and not stopped and len(new) < s.max_new_tokens
    state.finish_reason = "stop" if stopped or len(new) < s.max_new_tokens else "length"
