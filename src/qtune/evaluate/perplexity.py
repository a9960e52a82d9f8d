"""Token-weighted loss and perplexity over a tokenized split, for the base model and for base + adapter.

Loss is the mean next-token cross-entropy (nats) over every supervised token (label != -100) of the split,
each token weighted equally whatever batch it falls in; perplexity = exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qtune.data.prepare import load_splits
from qtune.data.tokenize import IGNORE_INDEX, ResponseLogitsCollator, padding_collator
from qtune.jsonio import dumps
from qtune.model.adapters import load_trained
from qtune.rundir import RunDir


@torch.no_grad()
def split_loss(model, dataset, collate, batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy over the supervised tokens of ``dataset``.

    Args:
        model: a causal LM returning ``logits`` of shape [B, T, V].
        dataset: a sequence (``datasets.Dataset`` or list) of dicts with input_ids, attention_mask, labels.
        collate: pads a list of rows into tensors of shape [B, T]; logits are then computed only at the
            supervised positions (:class:`qtune.data.tokenize.ResponseLogitsCollator`).

    Returns:
        {"loss": nats per token, "perplexity": exp(loss), "tokens": supervised tokens counted}.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    collate = ResponseLogitsCollator(collate)  # LM-head logits only where a label is supervised
    total, count = 0.0, 0
    # Longest first, so batches hold similar lengths (little padding) and an out-of-memory shows at once.
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    for batch in DataLoader([dataset[i] for i in order], batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(dev) for k, v in batch.items()}
        n = int((batch["shift_labels"] != IGNORE_INDEX).sum())
        loss = model(**batch, use_cache=False).loss  # mean over the batch's n supervised tokens
        total += loss.double().item() * n
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate_run(run_dir: str, splits: tuple[str, ...] = ("val", "test"), batch_size: int | None = None,
                 trust_remote_code: bool = False) -> dict:
    """Loss and perplexity of the base and of base + adapter on each split, under the run's quantization.

    The base is loaded once; the base figures come from the same model with the adapter disabled.
    Writes ``eval.json`` in the run directory and returns {"base": {split: ...}, "adapter": {split: ...}}.

    Raises:
        QtuneError: ``run_dir`` holds no trained adapter or no prepared data.
    """
    rd = RunDir(Path(run_dir)).require_adapter()
    data = load_splits(rd.data)
    model, tokenizer, cfg = load_trained(rd.root, trust_remote_code)
    collate = padding_collator(tokenizer)
    bs = batch_size or cfg.train.eval_batch_size
    result: dict[str, dict] = {"base": {}, "adapter": {}}
    for name in splits:
        if name not in data:
            continue
        ds = data[name].remove_columns([c for c in data[name].column_names if c == "row"])
        with model.disable_adapter():
            result["base"][name] = split_loss(model, ds, collate, bs)
        result["adapter"][name] = split_loss(model, ds, collate, bs)
    rd.eval.write_text(dumps(result, indent=2), encoding="utf-8")
    return result
