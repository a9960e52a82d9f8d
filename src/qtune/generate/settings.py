"""Decoding settings of one generation and what it reports: :class:`GenerationSettings` (checked ranges,
:class:`SettingsError` naming the setting), :class:`Completion` (a finished answer) and :class:`StreamState`
(filled in by a stream)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP_STRINGS = 4
"""Most extra stop strings per request (OpenAI's limit); each costs ~0.1 s to prepare, so this bounds that cost."""
MAX_STOP_CHARS = 64
"""Longest extra stop string, in characters (the preparation cost grows with the length too)."""


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
