"""Prompt formats. The same functions format training samples and, later, every prompt the server sends.

``alpaca`` is the format CodeAlpaca was published with (Taori et al. 2023, Stanford Alpaca; Chaudhary 2023,
CodeAlpaca): a preamble, ``### Instruction:``, an optional ``### Input:`` and ``### Response:``.
``chat`` uses the tokenizer's own chat template (``tokenizer.apply_chat_template``), with the instruction and
input joined by a blank line as the user message.
"""

from __future__ import annotations

from typing import Literal

Template = Literal["alpaca", "chat"]

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


def user_message(instruction: str, input: str = "") -> str:
    """The user turn for chat templates: the instruction, then the input after a blank line if there is one."""
    return f"{instruction}\n\n{input}" if input else instruction


def format_prompt(instruction: str, input: str = "", template: Template = "alpaca", tokenizer=None) -> str:
    """The prompt text that precedes the response; the model is trained to continue it.

    Args:
        instruction: the task.
        input: optional context; selects Alpaca's with-input variant when non-empty.
        template: "alpaca" or "chat".
        tokenizer: required for "chat" (its ``chat_template`` is applied with a generation prompt).

    Raises:
        ValueError: "chat" without a tokenizer that has a chat template, or an unknown template.
    """
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use template 'alpaca'")
        messages = [{"role": "user", "content": user_message(instruction, input)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; expected 'alpaca' or 'chat'")
