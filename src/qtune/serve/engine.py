"""The one generation engine behind every front end (``qtune generate``, ``qtune chat``, the web app, the API).

It loads base + adapter from a run directory (or a merged model written by ``qtune export --merged``), renders
conversations with exactly the template the adapter was trained with
(:func:`qtune.data.templates.format_conversation`, tokenized by :func:`qtune.data.tokenize.encode_prompt` as in
training), and generates with transformers' ``generate``: greedy or sampled, streamed through
``TextIteratorStreamer``, stopped at EOS, at stop strings or at ``max_new_tokens``. Generation is serialized by
a lock, so front ends may call it from several threads.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from qtune.data.templates import ALPACA_STOP, Message, format_conversation, format_prompt
from qtune.data.tokenize import encode_prompt
from qtune.errors import QtuneError

MERGED_META = "qtune.json"
"""File in a merged-model directory naming the template (and source run) the weights were trained with."""
QUANT_CHOICES = ("nf4", "fp4", "int8", "fp16", "bf16", "none")


@dataclass
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy decoding.

    Raises:
        ValueError: a setting out of range (message names the setting and the allowed range).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    """Extra stop strings (the template's own are always added); the answer ends before the first one."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
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
    """Stops ``generate`` when the consumer of a stream has gone away (closed generator, client disconnect)."""

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

    def prompt_budget(self, settings: GenerationSettings) -> int:
        """Most prompt tokens that leave room for ``settings.max_new_tokens`` in the context window.

        Raises:
            ValueError: ``max_new_tokens`` leaves no room for a prompt.
        """
        budget = self.context_length - settings.max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens must be below the model's context of {self.context_length} tokens, "
                             f"got {settings.max_new_tokens}")
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
        if stops:
            kwargs |= dict(stop_strings=list(stops), tokenizer=self.tokenizer)
        return kwargs

    def _check_fits(self, ids: list[int], settings: GenerationSettings) -> None:
        budget = self.prompt_budget(settings)
        if len(ids) > budget:
            raise ValueError(f"the prompt has {len(ids)} tokens; with max_new_tokens {settings.max_new_tokens} "
                             f"at most {budget} fit in the model's context of {self.context_length}")

    def stream(self, prompt_ids: list[int], settings: GenerationSettings | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (``TextIteratorStreamer``).

        Generation ends at EOS, at a stop string (the template's and ``settings.stop``; the stop string itself
        is never yielded) or after ``max_new_tokens``. Closing the iterator early stops generation.

        Args:
            prompt_ids: prompt token ids (:meth:`encode`), at most :meth:`prompt_budget` of them.
            settings: decoding settings; greedy with 256 new tokens when None.
            state: filled with token counts, finish reason and the full text once the iterator is exhausted.

        Raises:
            ValueError: the prompt does not fit in the context with ``max_new_tokens``.
        """
        s = settings or GenerationSettings()
        state = state if state is not None else StreamState()
        self._check_fits(prompt_ids, s)
        stops = tuple(self.stops) + tuple(s.stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        ids = torch.tensor([prompt_ids], device=self.device)
        result: dict = {}

        def run():
            try:
                with self._lock, torch.no_grad():
                    if cancel.is_set():
                        streamer.end()
                        return
                    result["out"] = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                        stopping_criteria=[_Cancelled(cancel)], **self._generate_kwargs(s, stops))
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
            if tail:
                pieces.append(tail)
                yield tail
        finally:
            cancel.set()  # generate() stops at its next token; the streamer's queue is unbounded
            thread.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, len(prompt_ids):].tolist()
        state.prompt_tokens = len(prompt_ids)
        state.completion_tokens = len(new)
        ended = trimmer.stopped or (new and new[-1] == self.tokenizer.eos_token_id)
        state.finish_reason = "stop" if ended or len(new) < s.max_new_tokens else "length"
        state.text = "".join(pieces)

    def complete(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> Completion:
        """The whole answer to a conversation (``messages`` must fit; see :mod:`qtune.serve.session`).

        Raises:
            ValueError: malformed messages or a prompt that does not fit in the context.
        """
        state = StreamState()
        for _ in self.stream(self.encode(self.chat_prompt(messages)), settings, state):
            pass
        return Completion(state.text.strip(), state.prompt_tokens, state.completion_tokens, state.finish_reason)

    def answer(self, instruction: str, input: str = "", settings: GenerationSettings | None = None) -> str:
        """The adapter's answer to one instruction (with optional input), in the training template."""
        state = StreamState()
        for _ in self.stream(self.encode(self.prompt(instruction, input)), settings, state):
            pass
        return state.text.strip()

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
        with self._lock:
            out = self.model.generate(**batch, **self._generate_kwargs(s, stops))
        answers = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            text, _ = _trim_stops(self.tokenizer.decode(row, skip_special_tokens=True), stops)
            answers.append(text.strip())
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
