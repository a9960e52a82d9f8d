"""Several prompts' answers, generated in batches (:meth:`qtune.generate.Engine.generate_batch`, HumanEval's
path): prompts sorted longest first, left-padded and masked, each row ending as a stream ends."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from qtune.generate.settings import GenerationSettings

if TYPE_CHECKING:
    from qtune.generate.engine import Engine


@torch.no_grad()
def generate_batch(
    engine: Engine,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    inputs: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """:meth:`Engine.generate_batch <qtune.generate.Engine.generate_batch>` (its arguments, answers and errors)."""
    s = settings or GenerationSettings()
    if inputs is not None and len(inputs) != len(prompts):
        raise ValueError(f"{len(inputs)} inputs for {len(prompts)} prompts: expected one input per prompt")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [engine.encode(engine.prompt(p, inputs[i] if inputs is not None else "")) for i, p in enumerate(prompts)]
    for j, ids in enumerate(encoded):
        try:
            engine._check_fits(ids, s)
        except ValueError as e:
            raise ValueError(f"prompt {j}: {e}") from None
    end = engine.answer_end(s)
    order = sorted(range(len(encoded)), key=lambda j: -len(encoded[j]))
    size = batch_size or max(1, len(order))
    answers: list[str] = [""] * len(encoded)
    for b in range(0, len(order), size):
        rows = [encoded[j] for j in order[b : b + size]]
        width = max(len(x) for x in rows)
        batch = torch.tensor([[engine._pad_id] * (width - len(x)) + x for x in rows], device=engine.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows], device=engine.device)
        criteria = engine._stopping_criteria(end, width)
        with engine._lock:
            out = engine.model.generate(
                input_ids=batch, attention_mask=mask, stopping_criteria=criteria, **engine._generate_kwargs(s)
            )
        for row, j in zip(out[:, width:].tolist(), order[b : b + size], strict=True):
            if engine.tokenizer.eos_token_id in row:
                row = row[: row.index(engine.tokenizer.eos_token_id)]
            text = engine.tokenizer.decode(row, skip_special_tokens=True)
            cut = end.find(text)
            answers[j] = text if cut is None else text[:cut]
        if progress:
            progress(min(b + size, len(order)), len(order))
    return answers
