"""Session holding: a conversation kept across turns, fitted into the model's context window.

A conversation is an optional system prompt plus a list of turns (user message, assistant answer). Each new
prompt renders the whole conversation in the training template; when it would exceed the prompt budget (the
context window less ``max_new_tokens``), the oldest turns are left out of the prompt first, the system prompt
always stays, and the reply says how many turns were left out. The transcript keeps every turn.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from qtune.data.templates import Message, check_messages
from qtune.generate import Engine, GenerationSettings, StreamState


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
        return (
            f"The conversation is longer than the context window: the oldest {self.dropped} {turns} "
            "were left out of this prompt (the system prompt is kept)."
        )


def _smallest(fits, start: int, n: int) -> int | None:
    """Smallest ``d`` in ``[0, n]`` with ``fits(d)``, or None; ``fits`` must be monotone (``fits(d)`` implies
    ``fits(d + 1)``). Probes ``start`` first, then gallops away from it and bisects: O(log |answer - start|)
    probes, most of them near ``start``."""
    bad, good = -1, n + 1  # fits(-1) is False and fits(n + 1) True by convention; neither is probed
    step = 1
    if fits(start):
        good = start
        while good - step > bad:
            if fits(good - step):
                good, step = good - step, step * 2
            else:
                bad = good - step
    else:
        bad = start
        while bad < n:
            probe = min(bad + step, n)
            if fits(probe):
                good = probe
                break
            bad, step = probe, step * 2
    while good - bad > 1:
        mid = (bad + good) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good if good <= n else None


def fit_messages(engine: Engine, messages: Sequence[Message], settings: GenerationSettings) -> Fitted:
    """Leave out the fewest oldest user/assistant pairs so that the rendered prompt fits ``engine.prompt_budget``.

    Linear in the conversation: each message is tokenized at most once, newest first and only as far back as
    could fit, which estimates how many pairs to leave out; the exact number is then found by encoding the
    rendered prompt near that estimate a few times (O(log error) encodes, each about the size of the context).

    Args:
        messages: an optional system message, then user/assistant turns ending with a user message.

    Raises:
        ValueError: malformed messages or ``max_new_tokens`` leaving no room (see ``Engine.prompt_budget``).
        ContextOverflow: even the system prompt and the last user message alone do not fit.
    """
    check_messages(messages)
    budget = engine.prompt_budget(settings)
    head = [dict(messages[0])] if messages[0]["role"] == "system" else []
    body = [dict(m) for m in messages[len(head) :]]
    n_pairs = (len(body) - 1) // 2
    encoded: dict[int, list[int]] = {}

    def prompt_ids(dropped: int) -> list[int]:
        if dropped not in encoded:
            encoded[dropped] = engine.encode(engine.chat_prompt(head + body[2 * dropped :]))
        return encoded[dropped]

    def overflow(taken: str) -> ContextOverflow:
        return ContextOverflow(
            f"the message is too long: with the system prompt it takes {taken} tokens, but at most {budget} fit "
            f"(context {engine.context_length} tokens less max_new_tokens {settings.max_new_tokens}); shorten it "
            "or lower max_new_tokens"
        )

    chars = sum(len(m["content"]) for m in head + body[-1:])
    if chars > budget * engine.max_token_chars:  # so long that it cannot fit: not worth tokenizing
        raise overflow(f"at least {chars // engine.max_token_chars}")
    used = len(prompt_ids(n_pairs))
    if used > budget:
        raise overflow(str(used))
    estimate = n_pairs  # pairs to leave out, by the per-message counts
    for k in range(n_pairs):  # the k-th newest earlier pair, each message tokenized once
        pair = body[len(body) - 3 - 2 * k : len(body) - 1 - 2 * k]
        if sum(len(m["content"]) for m in pair) > (budget - used + 1) * engine.max_token_chars:
            break  # cannot fit: not worth tokenizing
        used += sum(engine.count_tokens(m["content"]) for m in pair) + engine.pair_overhead
        if used > budget:
            break
        estimate = n_pairs - k - 1
    dropped = _smallest(lambda d: len(prompt_ids(d)) <= budget, estimate, n_pairs)
    assert dropped is not None  # dropping all n_pairs fits: checked above (used <= budget)
    return Fitted(head + body[2 * dropped :], prompt_ids(dropped), dropped)


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

    def ask(self, user: str, settings: GenerationSettings | None = None) -> Reply:
        """Start the answer to ``user``; iterate the returned :class:`Reply` to stream it.

        Raises:
            ValueError: an empty message, or settings out of range.
            ContextOverflow: the message does not fit in the context window.
        """
        if not user.strip():  # only to test emptiness: the message itself is sent as typed
            raise ValueError("empty message: type a question first")
        s = settings or GenerationSettings()
        return Reply(self, user, fit_messages(self.engine, self.messages(user), s), s)

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns.clear()

    def transcript(self) -> str:
        """The whole conversation as JSON: ``{"system": ..., "turns": [{"user": ..., "assistant": ...}]}``."""
        return json.dumps(
            {"system": self.system, "turns": [asdict(t) for t in self.turns]}, indent=2, ensure_ascii=False
        )


class Reply:
    """A streamed answer; iterating it yields text pieces and then records the turn in the session (also when
    the iteration is abandoned or stopped, with the text produced so far), exactly as generated.

    Attributes:
        dropped: turns left out of this prompt to fit the context; ``notice`` says so in a sentence.
        state: token counts and finish reason, complete after the iteration.
    """

    def __init__(self, session: ChatSession, user: str, fitted: Fitted, settings: GenerationSettings):
        self.session, self.user, self.fitted, self.settings = session, user, fitted, settings
        self.dropped = fitted.dropped
        self.notice = fitted.notice
        self.state = StreamState()
        self._cancel = threading.Event()

    def stop(self) -> None:
        """Stop the answer at its next token (from any thread); the iteration then ends and the turn keeps the
        text so far."""
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self.session.engine.stream(self.fitted.prompt_ids, self.settings, self.state, self._cancel):
                pieces.append(piece)
                yield piece
        finally:
            self.session.turns.append(Turn(self.user, "".join(pieces)))

    def text(self) -> str:
        """Run the whole answer and return it."""
        return "".join(self)
