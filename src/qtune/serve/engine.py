"""Generation from base + adapter, with the prompt formatted by the template the adapter was trained with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtune.data.templates import format_prompt
from qtune.data.tokenize import encode_prompt
from qtune.model.adapters import load_trained


@dataclass
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


class Engine:
    """A loaded run (base + adapter) that answers instructions.

    Args:
        run_dir: a run directory written by ``qtune train``.

    Raises:
        QtuneError: ``run_dir`` holds no adapter.
    """

    def __init__(self, run_dir: str):
        self.model, self.tokenizer, self.cfg = load_trained(run_dir)

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text, in the run's training template (:func:`qtune.data.templates.format_prompt`)."""
        return format_prompt(instruction, input, self.cfg.data.template, self.tokenizer)

    @torch.no_grad()
    def answer(self, instruction: str, input: str = "", settings: GenerationSettings | None = None) -> str:
        """The adapter's answer; generation stops at the EOS token or after ``max_new_tokens``."""
        s = settings or GenerationSettings()
        ids = torch.tensor([encode_prompt(self.prompt(instruction, input), self.tokenizer)])
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        enc = {k: v.to(next(self.model.parameters()).device) for k, v in enc.items()}
        sample = s.temperature > 0
        out = self.model.generate(
            **enc,
            max_new_tokens=s.max_new_tokens,
            do_sample=sample,
            temperature=s.temperature if sample else None,
            top_p=s.top_p if sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
