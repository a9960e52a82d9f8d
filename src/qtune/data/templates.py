"""Prompt formats. The same functions format training samples and, later, every prompt the server sends.

``alpaca`` is the format CodeAlpaca was published with (Taori et al. 2023, Stanford Alpaca; Chaudhary 2023,
CodeAlpaca): a preamble, ``### Instruction:``, an optional ``### Input:`` and ``### Response:``.
``chat`` uses the tokenizer's own chat template (``tokenizer.apply_chat_template``), with the instruction and
input joined by a blank line as the user message.

A conversation (a system prompt, then user/assistant turns ending with a user message) is rendered by
:func:`format_conversation`; a one-turn conversation gives exactly the training prompt, because
:func:`format_prompt` is built on it.

Every text is placed exactly as given (no strip): an answer or an input that starts with indentation keeps it.
Whitespace is looked at only to decide whether an input is empty (empty or whitespace only: no input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Template = Literal["alpaca", "chat"]
"""A prompt template (``data.template``)."""
TEMPLATES: tuple[Template, ...] = get_args(Template)
Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": text}``."""

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PREAMBLE = ALPACA_NO_INPUT.split("\n\n", 1)[0]
"""The no-input preamble: the alpaca template's system prompt (a conversation's system message replaces it)."""
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_STOP = ("### Instruction:", "### Input:", "### Response:")
"""The template's own section headers: an alpaca answer ends before the first of them, wherever it appears (the
model ran on past its answer instead of emitting EOS)."""
ALPACA_HEADER = r"### [^\s:][^\n\r:]{0,39}:[ \t\r]*"
"""One line in the alpaca template's section-header form (a regular expression for the line without its newline):
``###``, a space, a label of 1 to 40 characters without a colon, a colon, then nothing but spaces, e.g.
``### Answer:`` or ``### Expected Output:``. An alpaca answer also ends where a line of this form begins
(:class:`qtune.generate.AnswerEnd`); ``### Example`` (no colon) or ``### Step 1: do x`` (text after the colon) is
no such line."""


def check_messages(messages: Sequence[Message]) -> None:
    """Raises ValueError unless ``messages`` is an optional system message, then alternating user/assistant
    messages that start and end with a user message, every content a string. Errors name a message by its index
    in ``messages`` (the system message, when there is one, is message 0)."""
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    start = 1 if messages[0].get("role") == "system" else 0
    body = list(messages[start:])
    for i, m in enumerate(body, start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise ValueError(
                f"message {i}: expected role {expected!r} (system first, then user/assistant "
                f"alternating), got {m.get('role')!r}"
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be text")
    if not body or body[-1]["role"] != "user":
        raise ValueError("a conversation must end with a user message")


def format_conversation(messages: Sequence[Message], template: Template = "alpaca", tokenizer=None) -> str:
    """The prompt text for a whole conversation, up to where the assistant's next answer starts.

    ``alpaca``: the system message (default: the Alpaca preamble the adapter was trained with), a blank line,
    then per turn ``### Instruction:`` / ``### Response:`` sections; earlier answers follow their
    ``### Response:`` exactly as given and are separated from the next turn by a blank line. ``chat``: the
    tokenizer's chat template with a generation prompt. A single user message without a system message gives
    exactly the training prompt (:func:`format_prompt` with no input).

    Args:
        messages: see :func:`check_messages`.
        template: "alpaca" or "chat".
        tokenizer: required for "chat".

    Raises:
        ValueError: malformed messages, "chat" without a chat template, or an unknown template.
    """
    check_messages(messages)
    if template == "alpaca":
        system = messages[0]["content"] if messages[0]["role"] == "system" else ALPACA_PREAMBLE
        body = messages[1:] if messages[0]["role"] == "system" else messages
        parts = [system, "\n\n"]
        for i in range(0, len(body), 2):
            parts.append(ALPACA_TURN.format(instruction=body[i]["content"]))
            if i + 1 < len(body):
                parts.append(body[i + 1]["content"] + "\n\n")
        return "".join(parts)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use template 'alpaca'")
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; expected 'alpaca' or 'chat'")


def user_message(instruction: str, input: str = "") -> str:
    """The user turn for chat templates: the instruction, then the input after a blank line if there is one (an
    input that is empty or whitespace only is none)."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def format_prompt(instruction: str, input: str = "", template: Template = "alpaca", tokenizer=None) -> str:
    """The prompt text that precedes the response; the model is trained to continue it.

    Args:
        instruction: the task.
        input: optional context; selects Alpaca's with-input variant unless empty or whitespace only.
        template: "alpaca" or "chat".
        tokenizer: required for "chat" (its ``chat_template`` is applied with a generation prompt).

    Raises:
        ValueError: "chat" without a tokenizer that has a chat template, or an unknown template.
    """
    if template == "alpaca" and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected 'alpaca' or 'chat'")
    return format_conversation([{"role": "user", "content": user_message(instruction, input)}], template, tokenizer)


def _jinja_literal(text: str) -> str:
    """``text`` as a Jinja string expression that prints it verbatim."""
    import json

    return "{{ " + json.dumps(text) + " }}"


def adds_bos(tokenizer) -> bool:
    """Whether :func:`qtune.data.tokenize.encode_prompt` puts the tokenizer's BOS token before a prompt."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def export_chat_template(template: Template, tokenizer) -> str:
    """A Jinja chat template (the ``chat_template`` format of transformers, llama.cpp, vLLM, Ollama) that renders a
    conversation into exactly the text qtune trains and serves with, so a tool that uses an exported model's
    embedded template prompts it as it was trained.

    ``alpaca``: the tokenizer's BOS when :func:`adds_bos` (qtune's encoding adds it), then
    :func:`format_conversation`'s text; a conversation that ends with an assistant message (a training sample)
    ends with that answer and the EOS token, as in training. The ``### Response:`` header is part of each user
    turn, so ``add_generation_prompt`` changes nothing. ``chat``: the tokenizer's own template, unchanged.

    Raises:
        ValueError: ``chat`` with a tokenizer without a chat template, or an unknown template.
    """
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use template 'alpaca'")
        return tokenizer.chat_template
    if template != "alpaca":
        raise ValueError(f"unknown template {template!r}; expected 'alpaca' or 'chat'")
    turn_head, turn_tail = ALPACA_TURN.split("{instruction}")
    return "".join(
        [
            "{{- bos_token -}}" if adds_bos(tokenizer) else "",
            "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}"
            "{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            _jinja_literal(ALPACA_PREAMBLE),
            "{%- set loop_messages = messages -%}{%- endif -%}",
            _jinja_literal("\n\n"),
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}",
            _jinja_literal(turn_head),
            "{{- message['content'] -}}",
            _jinja_literal(turn_tail),
            "{%- elif loop.last -%}{{- message['content'] -}}{{- eos_token -}}",
            "{%- else -%}{{- message['content'] -}}",
            _jinja_literal("\n\n"),
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    )
