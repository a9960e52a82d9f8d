"""Where an answer ends (:class:`AnswerEnd`), and the pieces that act on it: :class:`_StopTrimmer` (a stream never
shows what the end cuts off) and the transformers stopping criteria (:class:`HeaderStop` for section-header lines,
:class:`_Cancelled` for a cancelled or ended stream)."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import regex
import torch
from transformers import StoppingCriteria

HEADER_TAIL_TOKENS = 192
"""Generated tokens :class:`HeaderStop` decodes to find the last line: a header line has at most 45 characters,
and a byte-level token spells at least one byte of a character of at most 4."""


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
