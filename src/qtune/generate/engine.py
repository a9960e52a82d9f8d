"""The engine: a loaded model (a run's base + adapter, a merged export, or a model already loaded), its prompts in
the training template, the context budget, and the lock and cancellation that every generation shares.
Generation itself: :mod:`qtune.generate.streaming` (one prompt, streamed) and :mod:`qtune.generate.batching`
(several prompts in batches)."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import torch
from transformers import StoppingCriteria, StopStringCriteria

from qtune.config import QUANT_FORMATS
from qtune.data.templates import ALPACA_HEADER, ALPACA_STOP, Message, Template, format_conversation, format_prompt
from qtune.data.tokenize import encode_prompt
from qtune.errors import QtuneError
from qtune.generate.batching import generate_batch
from qtune.generate.settings import Completion, GenerationSettings, SettingsError, StreamState
from qtune.generate.stops import AnswerEnd, HeaderStop
from qtune.generate.streaming import stream_answer

MERGED_META = "qtune.json"
"""File in a merged-model directory naming the template (and source run) the weights were trained with."""
LOCK_POLL_S = 0.1
"""How often a generation waiting for the engine checks whether it was cancelled meanwhile, in seconds."""


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

    def _release(self) -> None:
        """Free the engine's lock (taken by :meth:`_acquire`)."""
        self._lock.release()

    def _track(self, cancel: threading.Event) -> None:
        """Count a generation as running until :meth:`_untrack`, so that :meth:`close` cancels it (at once when the
        engine is already closed)."""
        with self._active_lock:
            if self._closed:
                cancel.set()
            self._active.add(cancel)

    def _untrack(self, cancel: threading.Event) -> None:
        with self._active_lock:
            self._active.discard(cancel)

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
        yield from stream_answer(self, prompt_ids, settings, state, cancel)

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
        return generate_batch(self, prompts, settings, inputs, batch_size, progress)


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
