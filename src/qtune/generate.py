"""The one generation engine behind every front end (``qtune generate``, ``qtune chat``, the web app, the API).

It loads base + adapter from a run directory (or a merged model written by ``qtune export --merged``), renders
conversations with exactly the template the adapter was trained with
(:func:`qtune.data.templates.format_conversation`, tokenized by :func:`qtune.data.tokenize.encode_prompt` as in
training), and generates with transformers' ``generate``: greedy or sampled, streamed through
``TextIteratorStreamer``, stopped at EOS, at stop strings or at ``max_new_tokens``. Generation is serialized by
a lock, so front ends may call it from several threads.

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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import StoppingCriteria, StopStringCriteria, TextIteratorStreamer

from qtune.data.templates import ALPACA_STOP, Message, format_conversation, format_prompt
from qtune.data.tokenize import encode_prompt
from qtune.errors import QtuneError

MERGED_META = "qtune.json"
"""File in a merged-model directory naming the template (and source run) the weights were trained with."""
QUANT_CHOICES = ("nf4", "fp4", "int8", "fp16", "bf16", "none")
MAX_STOP_STRINGS = 4
"""Most extra stop strings per request (OpenAI's limit); each costs ~0.1 s to prepare, so this bounds that cost."""
MAX_STOP_CHARS = 64
"""Longest extra stop string, in characters (the preparation cost grows with the length too)."""
LOCK_POLL_S = 0.1
"""How often a generation waiting for the engine checks whether it was cancelled meanwhile, in seconds."""


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
            raise SettingsError("repetition_penalty",
                                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
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
    """One finished answer: text, token counts and why it ended ("stop": EOS or a stop string; "length")."""

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


class _StopTrimmer:
    """Holds back streamed text that may be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to show now (never part of a stop string)."""
        if self.stopped:
            return ""
        self.buf += piece
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.buf = self.buf[: min(cuts)], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` when the consumer of a stream has gone away (closed generator, client disconnect, Stop
    button, server shutdown)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _trim_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine:
    """A loaded model that answers conversations in its training template.

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
        if quant is not None and quant not in QUANT_CHOICES:
            raise QtuneError(f"--quant {quant!r}: expected one of {', '.join(QUANT_CHOICES)}")
        path = Path(run_dir)
        if (path / MERGED_META).is_file():
            self.model, self.tokenizer, self.template = _load_merged(path, quant)
            self.cfg = None
        else:
            from qtune.model.adapters import load_trained

            self.model, self.tokenizer, self.cfg = load_trained(run_dir, quant=quant)
            self.template = self.cfg.data.template
        self.name = path.resolve().name
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stops = ALPACA_STOP if self.template == "alpaca" else ()
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
            raise SettingsError("max_new_tokens", f"max_new_tokens must be below the model's context of "
                                f"{self.context_length} tokens, got {settings.max_new_tokens}")
        return budget

    # ---- generation ------------------------------------------------------------------------------------------

    def _generate_kwargs(self, s: GenerationSettings, stops: Sequence[str]) -> dict:
        sample = s.temperature > 0
        kwargs = dict(
            max_new_tokens=s.max_new_tokens,
            do_sample=sample,
            temperature=s.temperature if sample else None,
            top_p=s.top_p if sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return kwargs

    def _stopping_criteria(self, stops: Sequence[str]) -> list[StoppingCriteria]:
        return [StopStringCriteria(self.tokenizer, list(stops))] if stops else []

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
            raise ValueError(f"the prompt has {len(ids)} tokens; with max_new_tokens {settings.max_new_tokens} "
                             f"at most {budget} fit in the model's context of {self.context_length}")

    def stream(self, prompt_ids: list[int], settings: GenerationSettings | None = None,
               state: StreamState | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (``TextIteratorStreamer``).

        Generation ends at EOS, at a stop string (the template's and ``settings.stop``; the stop string itself
        is never yielded) or after ``max_new_tokens``. Closing the iterator early, setting ``cancel`` (from any
        thread) or :meth:`close` stops generation at its next token and frees the engine; a cancelled stream
        just ends, with ``state.cancelled`` set. The pieces join to exactly the decoded answer.

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
        stops = tuple(self.stops) + tuple(s.stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel if cancel is not None else threading.Event()
        with self._active_lock:
            if self._closed:
                cancel.set()
            self._active.add(cancel)
        ids = torch.tensor([prompt_ids], device=self.device)
        result: dict = {}

        def run():
            try:
                criteria = [_Cancelled(cancel), *self._stopping_criteria(stops)]  # prepared before taking the lock
                if not self._acquire(cancel):
                    streamer.end()
                    return
                try:
                    with torch.no_grad():
                        result["out"] = self.model.generate(
                            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                            stopping_criteria=criteria, **self._generate_kwargs(s, stops))
                finally:
                    self._lock.release()
            except Exception as e:  # surfaced in the consumer's thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        trimmer = _StopTrimmer(stops)
        pieces: list[str] = []
        try:
            for piece in streamer:
                text = trimmer.push(piece)
                if text:
                    pieces.append(text)
                    yield text
                if trimmer.stopped:
                    break
            tail = trimmer.flush()
            if tail and not cancel.is_set():
                pieces.append(tail)
                yield tail
            cancelled = cancel.is_set() and not trimmer.stopped
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
        new = result["out"][0, len(prompt_ids):].tolist()
        state.completion_tokens = len(new)
        ended = trimmer.stopped or (new and new[-1] == self.tokenizer.eos_token_id)
        state.cancelled = cancelled and not ended and len(new) < s.max_new_tokens
        state.finish_reason = "stop" if ended or len(new) < s.max_new_tokens else "length"

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
    def generate_batch(self, prompts: Sequence[str], settings: GenerationSettings | None = None) -> list[str]:
        """Answers to several instructions in one ``generate`` call.

        The prompts are left-padded with the pad token and masked, so with greedy decoding every answer equals
        :meth:`answer` for that instruction alone.

        Args:
            prompts: instructions (each rendered as a one-turn conversation in the training template).

        Returns:
            One answer per prompt, in order, cut at EOS and stop strings.

        Raises:
            ValueError: a prompt does not fit in the context.
        """
        s = settings or GenerationSettings()
        encoded = [self.encode(self.prompt(p)) for p in prompts]
        for ids in encoded:
            self._check_fits(ids, s)
        batch = self.tokenizer.pad({"input_ids": encoded}, padding=True, padding_side="left", return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        stops = tuple(self.stops) + tuple(s.stop)
        criteria = self._stopping_criteria(stops)
        with self._lock:
            out = self.model.generate(**batch, stopping_criteria=criteria, **self._generate_kwargs(s, stops))
        answers = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            text, _ = _trim_stops(self.tokenizer.decode(row, skip_special_tokens=True), stops)
            answers.append(text)
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
