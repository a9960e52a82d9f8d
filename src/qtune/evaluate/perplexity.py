"""Token-weighted loss and perplexity over a tokenized split, for the base model and for base + adapter.

Loss is the mean next-token cross-entropy (nats) over every supervised token (label != -100) of the split,
each token weighted equally; perplexity = exp(loss). The figure comes from :func:`split_loss`
(:mod:`qtune.train.validation`), the same function training's evaluation uses, so ``qtune eval`` and
``train_summary.json`` agree exactly for the same adapter and split.
"""

from __future__ import annotations

from pathlib import Path

from qtune.data.prepare import load_splits
from qtune.data.tokenize import padding_collator
from qtune.jsonio import dumps
from qtune.model.adapters import load_trained
from qtune.model.load import device
from qtune.model.quantize import compute_autocast
from qtune.rundir import RunDir
from qtune.train.validation import split_loss

__all__ = ["evaluate_run", "split_loss"]


def evaluate_run(
    run_dir: str,
    splits: tuple[str, ...] = ("val", "test"),
    batch_size: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Loss and perplexity of the base and of base + adapter on each split, under the run's quantization.

    The base is loaded once; the base figures come from the same model with the adapter disabled. Each figure is
    :func:`split_loss`'s {"loss", "perplexity", "tokens"}; ``batch_size`` is ignored (the loss does not depend
    on one). Writes ``eval.json`` in the run directory and returns {"base": {split: ...}, "adapter": {split: ...}}.

    Raises:
        QtuneError: ``run_dir`` holds no trained adapter or no prepared data.
    """
    rd = RunDir(Path(run_dir)).require_adapter()
    data = load_splits(rd.data)
    model, tokenizer, cfg = load_trained(rd.root, trust_remote_code)
    collate = padding_collator(tokenizer)
    result: dict[str, dict] = {"base": {}, "adapter": {}}
    for name in splits:
        if name not in data:
            continue
        ds = data[name].remove_columns([c for c in data[name].column_names if c == "row"])
        with compute_autocast(cfg.quant, device()):  # the matmul precision training's evaluation had
            with model.disable_adapter():
                result["base"][name] = split_loss(model, ds, collate)
            result["adapter"][name] = split_loss(model, ds, collate)
    rd.eval.write_text(dumps(result, indent=2), encoding="utf-8")
    return result
