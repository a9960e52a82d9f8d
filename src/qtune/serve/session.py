"""Session holding: a conversation kept across turns, fitted into the model's context window.

A conversation is an optional system prompt plus a list of turns (user message, assistant answer). Each new
prompt renders the whole conversation in the training template; when it would exceed the prompt budget (the
context window less ``max_new_tokens``), the oldest turns are left out of the prompt first, the system prompt
always stays, and the reply says how many turns were left out. The transcript keeps every turn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from qtune.data.templates import Message, check_messages
from qtune.serve.engine import Engine, GenerationSettings, StreamState


class ContextOverflow(ValueError):
    """The newest message alone (with the system prompt) does not fit in the context window."""


@dataclass
class Turn:
    """One exchange: the user's message and the assistant's answer."""

    user: str
    assistant: str


@dataclass
class Fitted:
    """A conversation cut to fit: the messages sent, their prompt token ids, and how many turns were left out."""

    messages: list[Message]
    prompt_ids: list[int]
    dropped: int

    @property
    def notice(self) -> str | None:
        """A sentence for the user when turns were left out, else None."""
        if not self.dropped:
            return None
        turns = "turn" if self.dropped == 1 else "turns"
        return f"The conversation is longer than the context window: the oldest {self.dropped} {turns} " \
               "were left out of this prompt (the system prompt is kept)."


def fit_messages(engine: Engine, messages: Sequence[Message], settings: GenerationSettings) -> Fitted:
    """Leave out the oldest user/assistant pairs until the rendered prompt fits ``engine.prompt_budget``.

    Args:
        messages: an optional system message, then user/assistant turns ending with a user message.

    Raises:
        ValueError: malformed messages or ``max_new_tokens`` leaving no room (see ``Engine.prompt_budget``).
        ContextOverflow: even the system prompt and the last user message alone do not fit.
    """
    check_messages(messages)
    budget = engine.prompt_budget(settings)
    head = [dict(messages[0])] if messages[0]["role"] == "system" else []
    body = [dict(m) for m in messages[len(head):]]
    n_pairs = (len(body) - 1) // 2
    for dropped in range(n_pairs + 1):
        kept = head + body[2 * dropped:]
        ids = engine.encode(engine.chat_prompt(kept))
        if len(ids) <= budget:
            return Fitted(kept, ids, dropped)
    raise ContextOverflow(
        f"the message is too long: with the system prompt it takes {len(ids)} tokens, but at most {budget} fit "
        f"(context {engine.context_length} tokens less max_new_tokens {settings.max_new_tokens}); shorten it "
        "or lower max_new_tokens")


@dataclass
class ChatSession:
    """One user's conversation with an engine.

    Args:
        engine: the loaded model.
        system: the system prompt; None uses the template's own (for ``alpaca``, the preamble it was trained
            with; for ``chat``, whatever the tokenizer's chat template adds).
    """

    engine: Engine
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self, user: str) -> list[Message]:
        """The conversation so far plus ``user`` as chat messages."""
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns:
            out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
        return out + [{"role": "user", "content": user}]

    def ask(self, user: str, settings: GenerationSettings | None = None) -> "Reply":
        """Start the answer to ``user``; iterate the returned :class:`Reply` to stream it.

        Raises:
            ValueError: an empty message, or settings out of range.
            ContextOverflow: the message does not fit in the context window.
        """
        if not user.strip():
            raise ValueError("empty message: type a question first")
        s = settings or GenerationSettings()
        return Reply(self, user, fit_messages(self.engine, self.messages(user), s), s)

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns.clear()

    def transcript(self) -> str:
        """The whole conversation as JSON: ``{"system": ..., "turns": [{"user": ..., "assistant": ...}]}``."""
        return json.dumps({"system": self.system, "turns": [asdict(t) for t in self.turns]}, indent=2,
                          ensure_ascii=False)


class Reply:
    """A streamed answer; iterating it yields text pieces and then records the turn in the session (also when
    the iteration is abandoned, with the text produced so far).

    Attributes:
        dropped: turns left out of this prompt to fit the context; ``notice`` says so in a sentence.
        state: token counts and finish reason, complete after the iteration.
    """

    def __init__(self, session: ChatSession, user: str, fitted: Fitted, settings: GenerationSettings):
        self.session, self.user, self.fitted, self.settings = session, user, fitted, settings
        self.dropped = fitted.dropped
        self.notice = fitted.notice
        self.state = StreamState()

    def __iter__(self) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self.session.engine.stream(self.fitted.prompt_ids, self.settings, self.state):
                pieces.append(piece)
                yield piece
        finally:
            self.session.turns.append(Turn(self.user, "".join(pieces).strip()))

    def text(self) -> str:
        """Run the whole answer and return it."""
        return "".join(self).strip()
