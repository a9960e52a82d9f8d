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
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from transformers import StoppingCriteria, StopStringCriteria, TextIteratorStreamer

from qtune.config import QUANT_FORMATS
from qtune.data.templates import ALPACA_HEADER, ALPACA_STOP, Message, Template, format_conversation, format_prompt
from qtune.data.tokenize import encode_prompt
from qtune.errors import QtuneError

MERGED_META = "qtune.json"
"""File in a merged-model directory naming the template (and source run) the weights were trained with."""
MAX_STOP_STRINGS = 4
"""Most extra stop strings per request (OpenAI's limit); each costs ~0.1 s to prepare, so this bounds that cost."""
MAX_STOP_CHARS = 64
"""Longest extra stop string, in characters (the preparation cost grows with the length too)."""
LOCK_POLL_S = 0.1
"""How often a generation waiting for the engine checks whether it was cancelled meanwhile, in seconds."""
HEADER_TAIL_TOKENS = 192
"""Generated tokens :class:`HeaderStop` decodes to find the last line: a header line has at most 45 characters,
and a byte-level token spells at least one byte of a character of at most 4."""


class SettingsError(ValueError):
    """A decoding setting out of range; ``field`` names it (``max_new_tokens``, ``temperature``, ``stop``, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy decoding.

    Raises:
        SettingsError: a setting out of range (a ValueError; the message names the setting and the allowed range).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    """Extra stop strings (the template's own are always added); the answer ends before the first one. At most
    ``MAX_STOP_STRINGS`` of at most ``MAX_STOP_CHARS`` characters each."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise SettingsError("max_new_tokens", f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise SettingsError("temperature", f"temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SettingsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise SettingsError(
                "repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SettingsError("stop", f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for i, text in enumerate(self.stop):
            if not isinstance(text, str):
                raise SettingsError("stop", f"stop[{i}]: expected a string, got {type(text).__name__}")
            if len(text) > MAX_STOP_CHARS:
                raise SettingsError("stop", f"stop[{i}]: at most {MAX_STOP_CHARS} characters, got {len(text)}")
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class Completion:
    """One finished answer: text, token counts and why it ended ("stop": EOS, a stop string or a header line;
    "length")."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class StreamState:
    """Filled in while :meth:`Engine.stream` runs; complete once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    text: str = ""
    cancelled: bool = False
    """True when the generation was cancelled (its ``cancel`` event or :meth:`Engine.close`) before it ended."""


class AnswerEnd:
    """Where an answer ends: before the first of ``stops`` (anywhere in the text), or at the start of the first
    line in the template's section-header form ``header`` (a regular expression for one whole line without its
    newline; e.g. :data:`qtune.data.templates.ALPACA_HEADER`). The text before that point, its newlines included,
    is the answer.

    A header line counts once its newline was generated, or when the generation ended right after it; a line
    such as ``### Example`` (no colon) or ``### Step 1: do x`` (text after the colon) is not one.
    """

    def __init__(self, stops: Sequence[str] = (), header: str | None = None):
        self.stops = tuple(s for s in stops if s)
        self.header = header
        if header:
            self._ended_line = re.compile(rf"^(?:{header})\n", re.M)
            self._last_line = re.compile(rf"^(?:{header})(?:\n|\Z)", re.M)
            self._partial = regex.compile(header)

    def find(self, text: str, final: bool = True, start: int = 0) -> int | None:
        """Index in ``text`` where the answer ends, or None when it does not end in ``text``.

        Args:
            text: the generated text so far (``final``: all of it).
            final: whether generation has ended, so that a header line at the very end counts without its newline.
            start: search from here on (a caller that knows there is no end before ``start``).
        """
        cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if self.header:
            m = (self._last_line if final else self._ended_line).search(text, start)
            if m:
                cuts.append(m.start())
        return min(cuts) if cuts else None

    def hold_from(self, text: str, start: int = 0) -> int:
        """Index from which the end of ``text`` may still become a stop string or a header line as more text is
        generated (``len(text)`` when none may): what a stream must not show yet. ``start``: nothing before it is
        held."""
        hold = len(text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text) - start), 0, -1):
                if text.endswith(s[:k]):
                    hold = min(hold, len(text) - k)
                    break
        if self.header:
            line = max(start, text.rfind("\n") + 1)
            if line < len(text) and self._partial.fullmatch(text, pos=line, partial=True):
                hold = min(hold, line)
        return hold


class _StopTrimmer:
    """Streams an answer's text without ever showing what :class:`AnswerEnd` cuts off: text that may still turn
    into a stop string or a header line is held back until it is known not to."""

    def __init__(self, end: AnswerEnd):
        self.end = end
        self.text = ""  # everything generated so far
        self.shown = 0  # text[:shown] was returned; no end lies before it
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to show now (never part of what the answer's end cuts off)."""
        self.text += piece
        cut = self.end.find(self.text, final=False, start=self.shown)
        self.stopped = self.stopped or cut is not None
        safe = min(len(self.text) if cut is None else cut, self.end.hold_from(self.text, self.shown))
        out, self.shown = self.text[self.shown : safe], max(self.shown, safe)
        return out

    def flush(self) -> str:
        """The rest of the answer once generation has ended."""
        cut = self.end.find(self.text, final=True, start=self.shown)
        end = len(self.text) if cut is None else cut
        self.stopped = self.stopped or cut is not None
        out, self.shown = self.text[self.shown : end], end
        return out


class HeaderStop(StoppingCriteria):
    """Stops each row of ``generate`` once it has written a whole line in the template's section-header form
    (``header``, as for :class:`AnswerEnd`), checking only the tail of what was generated, and only on steps whose
    new token holds a newline (a header line counts from its newline on).

    Args:
        tokenizer: the model's tokenizer.
        header: regular expression for one header line, without its newline.
        start: index in ``input_ids`` where the generated tokens begin (the prompt's length; for a left-padded
            batch, its width).
    """

    def __init__(self, tokenizer, header: str, start: int):
        self.tokenizer, self.start = tokenizer, start
        self.line = re.compile(rf"^(?:{header})\n", re.M)

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        width = input_ids.shape[1]
        for row in input_ids:
            if width <= self.start or "\n" not in self.tokenizer.decode(row[-1:], skip_special_tokens=True):
                done.append(False)
                continue
            first = max(self.start, width - HEADER_TAIL_TOKENS)
            text = self.tokenizer.decode(row[first:].tolist(), skip_special_tokens=True)
            if first > self.start:  # the tail's first line may have begun before it
                text = text[text.find("\n") + 1 :]
            done.append(self.line.search(text) is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` when the consumer of a stream has gone away (closed generator, client disconnect, Stop
    button, server shutdown) or the answer has ended."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    """A loaded model that answers conversations in its training template (:meth:`from_model` wraps a model that
    is already loaded).

    Attributes:
        model, tokenizer, template, name, cfg: the model (base + adapter), its tokenizer, the training template,
            the directory's name (the API's model id) and the run's configuration (None for a merged model).
        context_length: the model's context window, in tokens.
        stops, header: the template's stop strings and section-header line form (:class:`AnswerEnd`).

    Args:
        run_dir: a run directory written by ``qtune train``, or a merged-model directory written by
            ``qtune export --merged``.
        quant: weight format of the base for serving: one of ``nf4``, ``fp4``, ``int8``, ``fp16``, ``bf16``,
            ``none`` (float32). None: the run's own training format (NF4 unless the run chose another); for a
            merged model, its saved 16-bit weights.

    Raises:
        QtuneError: ``run_dir`` is neither a run with an adapter nor a merged model, or ``quant`` is unknown.
    """

    def __init__(self, run_dir: str, quant: str | None = None):
        if quant is not None and quant not in QUANT_FORMATS:
            raise QtuneError(f"--quant {quant!r}: expected one of {', '.join(QUANT_FORMATS)}")
        path = Path(run_dir)
        if (path / MERGED_META).is_file():
            model, tokenizer, template = _load_merged(path, quant)
            self.cfg = None
        else:
            from qtune.model.adapters import load_trained

            model, tokenizer, self.cfg = load_trained(run_dir, quant=quant)
            template = self.cfg.data.template
        self._setup(model, tokenizer, template, path.resolve().name)

    @classmethod
    def from_model(cls, model, tokenizer, template: Template, name: str = "model", cfg=None) -> Engine:
        """An engine on a model already loaded (e.g. by :func:`qtune.model.adapters.load_trained`), answering in
        ``template`` ("alpaca" or "chat"); ``cfg`` is the run's configuration, if any."""
        engine = cls.__new__(cls)
        engine.cfg = cfg
        engine._setup(model, tokenizer, template, name)
        return engine

    def _setup(self, model, tokenizer, template: Template, name: str) -> None:
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stops = ALPACA_STOP if self.template == "alpaca" else ()
        self.header = ALPACA_HEADER if self.template == "alpaca" else None
        self._lock = threading.Lock()
        self._active: set[threading.Event] = set()
        self._active_lock = threading.Lock()
        self._closed = False

    @property
    def busy(self) -> bool:
        """True while a generation holds the engine."""
        return self._lock.locked()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompts ---------------------------------------------------------------------------------------------

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text, in the run's training template (:func:`qtune.data.templates.format_prompt`)."""
        return format_prompt(instruction, input, self.template, self.tokenizer)

    def chat_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text of a conversation (:func:`qtune.data.templates.format_conversation`).

        Raises:
            ValueError: malformed messages.
        """
        return format_conversation(messages, self.template, self.tokenizer)

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids exactly as training encoded prompts (:func:`qtune.data.tokenize.encode_prompt`)."""
        return encode_prompt(prompt, self.tokenizer)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` on its own (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def pair_overhead(self) -> int:
        """Template tokens one earlier user/assistant pair adds to a conversation's prompt besides its two
        messages' own tokens (an estimate: tokens may merge across the boundaries)."""
        one = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        last = [{"role": "user", "content": "c"}]
        extra = len(self.encode(self.chat_prompt(one + last))) - len(self.encode(self.chat_prompt(last)))
        return max(0, extra - self.count_tokens("a") - self.count_tokens("b"))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Most characters one vocabulary entry spells: a text of ``n`` characters has at least
        ``n / max_token_chars`` tokens (byte-level BPE and SentencePiece vocabularies), so far too long texts are
        recognised without tokenizing them."""
        return max(1, max(len(t) for t in self.tokenizer.get_vocab()))

    def prompt_budget(self, settings: GenerationSettings) -> int:
        """Most prompt tokens that leave room for ``settings.max_new_tokens`` in the context window.

        Raises:
            SettingsError: ``max_new_tokens`` leaves no room for a prompt (a ValueError).
        """
        budget = self.context_length - settings.max_new_tokens
        if budget < 1:
            raise SettingsError(
                "max_new_tokens",
                f"max_new_tokens must be below the model's context of "
                f"{self.context_length} tokens, got {settings.max_new_tokens}",
            )
        return budget

    # ---- generation ------------------------------------------------------------------------------------------

    def _generate_kwargs(self, s: GenerationSettings) -> dict:
        sample = s.temperature > 0
        return dict(
            max_new_tokens=s.max_new_tokens,
            do_sample=sample,
            temperature=s.temperature if sample else None,
            top_p=s.top_p if sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self._pad_id,
        )

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def answer_end(self, settings: GenerationSettings | None = None) -> AnswerEnd:
        """Where this engine's answers end with ``settings``: the template's stop strings and section-header
        lines, and ``settings.stop``."""
        s = settings or GenerationSettings()
        return AnswerEnd(tuple(self.stops) + tuple(s.stop), self.header)

    def _stopping_criteria(self, end: AnswerEnd, start: int) -> list[StoppingCriteria]:
        """Criteria that stop generation where ``end`` ends the answer; ``start``: where generated tokens begin."""
        criteria: list[StoppingCriteria] = [StopStringCriteria(self.tokenizer, list(end.stops))] if end.stops else []
        if end.header:
            criteria.append(HeaderStop(self.tokenizer, end.header, start))
        return criteria

    def _acquire(self, cancel: threading.Event) -> bool:
        """Take the engine's lock, or give up (False) once ``cancel`` is set while waiting."""
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if cancel.is_set():
                return False
        if cancel.is_set():
            self._lock.release()
            return False
        return True

    def close(self) -> None:
        """Cancel every running or waiting generation and every later one (server shutdown); each stops at its
        next token."""
        with self._active_lock:
            self._closed = True
            for event in self._active:
                event.set()

    def _check_fits(self, ids: list[int], settings: GenerationSettings) -> None:
        budget = self.prompt_budget(settings)
        if len(ids) > budget:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_new_tokens {settings.max_new_tokens} "
                f"at most {budget} fit in the model's context of {self.context_length}"
            )

    def stream(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings | None = None,
        state: StreamState | None = None,
        cancel: threading.Event | None = None,
    ) -> Generator[str, None, None]:
        """Yield the answer's text piece by piece as it is generated (``TextIteratorStreamer``).

        Generation ends at EOS, after ``max_new_tokens``, or where :meth:`answer_end` ends the answer (a stop
        string, the template's and ``settings.stop``, or a section-header line; neither is ever yielded: text
        that may become one is held back until it is known not to). Closing the iterator early, setting
        ``cancel`` (from any thread) or :meth:`close` stops generation at its next token and frees the engine; a
        cancelled stream just ends, with ``state.cancelled`` set. The pieces join to exactly the decoded answer,
        the answer :meth:`generate_batch` gives.

        Args:
            prompt_ids: prompt token ids (:meth:`encode`), at most :meth:`prompt_budget` of them.
            settings: decoding settings; greedy with 256 new tokens when None.
            state: filled with token counts, finish reason and the full text once the iterator is exhausted.
            cancel: set it to stop this generation (client disconnected, Stop button).

        Raises:
            ValueError: the prompt does not fit in the context with ``max_new_tokens``.
        """
        s = settings or GenerationSettings()
        state = state if state is not None else StreamState()
        self._check_fits(prompt_ids, s)
        end = self.answer_end(s)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel if cancel is not None else threading.Event()
        ended = threading.Event()  # the answer has ended (seen in the streamed text): stop at the next token
        with self._active_lock:
            if self._closed:
                cancel.set()
            self._active.add(cancel)
        ids = torch.tensor([prompt_ids], device=self.device)
        result: dict = {}

        def run():
            try:  # criteria prepared before taking the lock
                criteria = [_Cancelled(cancel), _Cancelled(ended), *self._stopping_criteria(end, len(prompt_ids))]
                if not self._acquire(cancel):
                    streamer.end()
                    return
                try:
                    with torch.no_grad():
                        result["out"] = self.model.generate(
                            input_ids=ids,
                            attention_mask=torch.ones_like(ids),
                            streamer=streamer,
                            stopping_criteria=criteria,
                            **self._generate_kwargs(s),
                        )
                finally:
                    self._lock.release()
            except Exception as e:  # surfaced in the consumer's thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
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
            with self._active_lock:
                self._active.discard(cancel)
        if "error" in result:
            raise result["error"]
        state.prompt_tokens = len(prompt_ids)
        state.text = "".join(pieces)
        if "out" not in result:  # cancelled before generation started
            state.cancelled, state.completion_tokens, state.finish_reason = True, 0, "stop"
            return
        new = result["out"][0, len(prompt_ids) :].tolist()
        state.completion_tokens = len(new)
        stopped = trimmer.stopped or (new and new[-1] == self.tokenizer.eos_token_id)
        state.cancelled = cancelled and not stopped and len(new) < s.max_new_tokens
        state.finish_reason = "stop" if stopped or len(new) < s.max_new_tokens else "length"

    def complete(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> Completion:
        """The whole answer to a conversation (``messages`` must fit; see :mod:`qtune.serve.session`).

        Raises:
            ValueError: malformed messages or a prompt that does not fit in the context.
        """
        state = StreamState()
        for _ in self.stream(self.encode(self.chat_prompt(messages)), settings, state):
            pass
        return Completion(state.text, state.prompt_tokens, state.completion_tokens, state.finish_reason)

    def answer(self, instruction: str, input: str = "", settings: GenerationSettings | None = None) -> str:
        """The adapter's answer to one instruction (with optional input), in the training template, exactly as
        generated (leading indentation kept)."""
        state = StreamState()
        for _ in self.stream(self.encode(self.prompt(instruction, input)), settings, state):
            pass
        return state.text

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings | None = None,
        inputs: Sequence[str] | None = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Answers to several instructions, generated in batches (HumanEval's path).

        Prompts are sorted longest first (stable), so a batch holds prompts of similar length, then left-padded
        with the pad token (EOS when there is none) and masked, so with greedy decoding every answer equals
        :meth:`answer` for that instruction alone. Each row ends as :meth:`stream` ends (EOS, ``max_new_tokens``,
        :meth:`answer_end`); a batch ends when its last row does.

        Args:
            prompts: instructions, each rendered with :meth:`prompt` (a one-turn conversation in the training
                template).
            settings: decoding settings; greedy with 256 new tokens when None.
            inputs: an input per instruction (:meth:`prompt`'s ``input``), or None for none.
            batch_size: prompts per ``generate`` call; None: all at once.
            progress: called as ``progress(done, total)`` after each batch.

        Returns:
            One answer per prompt, in order, decoded with special tokens dropped and cut where the answer ends.

        Raises:
            ValueError: a prompt does not fit in the context, ``inputs`` is not one per prompt, or ``batch_size``
                is below 1.
        """
        s = settings or GenerationSettings()
        if inputs is not None and len(inputs) != len(prompts):
            raise ValueError(f"{len(inputs)} inputs for {len(prompts)} prompts: expected one input per prompt")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        encoded = [self.encode(self.prompt(p, inputs[i] if inputs is not None else "")) for i, p in enumerate(prompts)]
        for j, ids in enumerate(encoded):
            try:
                self._check_fits(ids, s)
            except ValueError as e:
                raise ValueError(f"prompt {j}: {e}") from None
        end = self.answer_end(s)
        order = sorted(range(len(encoded)), key=lambda j: -len(encoded[j]))
        size = batch_size or max(1, len(order))
        answers: list[str] = [""] * len(encoded)
        for b in range(0, len(order), size):
            rows = [encoded[j] for j in order[b : b + size]]
            width = max(len(x) for x in rows)
            batch = torch.tensor([[self._pad_id] * (width - len(x)) + x for x in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows], device=self.device)
            criteria = self._stopping_criteria(end, width)
            with self._lock:
                out = self.model.generate(
                    input_ids=batch, attention_mask=mask, stopping_criteria=criteria, **self._generate_kwargs(s)
                )
            for row, j in zip(out[:, width:].tolist(), order[b : b + size], strict=True):
                if self.tokenizer.eos_token_id in row:
                    row = row[: row.index(self.tokenizer.eos_token_id)]
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                cut = end.find(text)
                answers[j] = text if cut is None else text[:cut]
            if progress:
                progress(min(b + size, len(order)), len(order))
        return answers


def _load_merged(path: Path, quant: str | None):
    """(model, tokenizer, template) of a directory written by :func:`qtune.serve.export.export_merged`."""
    from qtune.config import ModelConfig, QuantConfig
    from qtune.model.load import load_model, load_tokenizer

    meta = json.loads((path / MERGED_META).read_text(encoding="utf-8"))
    cfg = ModelConfig(name=str(path))
    q = quant or meta.get("dtype", "fp16")
    model = load_model(str(path), cfg, QuantConfig(quant=q))
    model.eval()
    return model, load_tokenizer(str(path), cfg), meta["template"]
