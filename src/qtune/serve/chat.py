"""The terminal chat of ``qtune chat``: a read-answer loop over a :class:`~qtune.serve.session.ChatSession`.

Each line the user types is one message; the answer streams to stdout as it is generated. ``/new`` (or
``/reset``) starts the conversation over, ``/exit`` (or ``/quit``) or end of input (Ctrl-D) quits, an empty line
is ignored. A message the session refuses (:class:`ValueError`: it does not fit in the context window) prints
one ``error:`` line on stderr and the loop goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qtune.generate import Engine, GenerationSettings
from qtune.serve.session import ChatSession

EXIT_COMMANDS = ("/exit", "/quit")
NEW_COMMANDS = ("/new", "/reset")


def _say(text: str = "", end: str = "\n") -> None:
    """Write to the current stdout (resolved at each call, so that a test's captured stdout is used)."""
    print(text, end=end, flush=True)


def chat_in_terminal(
    engine: Engine,
    settings: GenerationSettings,
    system: str | None = None,
    read: Callable[[str], str] = input,
) -> None:
    """Chat with ``engine`` until the user quits; ``system`` is the system prompt (None: the template's own),
    ``read(prompt)`` returns the user's next line and raises EOFError at the end of input."""
    session = ChatSession(engine, system)
    _say(
        f"qtune chat: {engine.name} ({engine.template} template, context {engine.context_length} tokens). "
        "/new starts over, /exit or Ctrl-D quits."
    )
    while True:
        try:
            line = read("you> ")
        except EOFError:
            _say()
            return
        command = line.strip()
        if not command:
            _say("(empty message ignored: type a question)")
        elif command in EXIT_COMMANDS:
            return
        elif command in NEW_COMMANDS:
            session.reset()
            _say("(new conversation)")
        else:
            _answer(session, line, settings)


def _answer(session: ChatSession, line: str, settings: GenerationSettings) -> None:
    """Stream the session's answer to ``line`` after ``assistant> `` (and its notice of turns left out, if any)."""
    try:
        reply = session.ask(line, settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return
    if reply.notice:
        _say(f"({reply.notice})")
    _say("assistant> ", end="")
    for piece in reply:
        _say(piece, end="")
    _say()
