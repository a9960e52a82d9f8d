"""Prove an export behaves like the trained model: re-score validation rows with each form of the model.

After ``qtune export`` writes a merged model and/or a GGUF file, the same validation rows are scored
(token-weighted cross-entropy, :func:`qtune.evaluate.perplexity.split_loss`) by

1. the adapter on the quantized base, as it was trained (what ``qtune eval`` reports);
2. the adapter on the unquantized base in float32, not merged: the model the export is meant to equal;
3. the merged model read back from disk (float32 compute over its 16-bit weights);
4. the GGUF file read back by transformers' GGUF loader (float32 compute).

The drift of an export is its loss minus row 2's. Rounding the merged weights to 16 bits moves the loss by well under a
thousandth of a nat; a wrong merge (an update folded into the wrong matrix, a tied matrix changed twice, a
mis-ordered tensor in the GGUF) moves it by tenths or more, so :data:`DEFAULT_MAX_DRIFT` separates the two.
Row 1 differs from row 2 by the quantization gap itself (the merged model runs on the 16-bit base, not on the
4-bit weights the adapter was trained against); it is printed, not gated.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.errors import QtuneError

DEFAULT_MAX_DRIFT = 0.01
"""Largest accepted |loss(export) - loss(adapter on the float32 base)|, nats per token. fp16 rounding of the merged
weights moved the loss by 0.00006 on the demo run (SmolLM2-135M, 32 validation rows, merged and GGUF alike); a
broken merge moves it by tenths (a tied LM head merged twice changed logits by 1.7); 0.01 lies between with
room on both sides."""

DEFAULT_CHECK_ROWS = 32
"""Validation rows scored by the check (the first ones of the split): enough tokens (about 2,000 on CodeAlpaca)
for a loss difference of 0.01 to stand out of float noise, a few seconds per model on a CPU for a 135M model."""


@dataclass
class ExportCheck:
    """Losses of each form of the model on the same rows; ``drift`` holds export minus reference per export (the
    check fails when one's absolute value exceeds ``max_drift``)."""

    rows: int
    tokens: int
    losses: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    max_drift: float = DEFAULT_MAX_DRIFT

    @property
    def ok(self) -> bool:
        return all(abs(d) <= self.max_drift for d in self.drift.values())

    def table(self) -> str:
        """Plain-text table: one line per model form, its loss and, for exports, the drift."""
        lines = [
            f"export check: {self.rows} validation rows, {self.tokens} supervised tokens "
            f"(max drift {self.max_drift} nats)"
        ]
        for name, loss in self.losses.items():
            drift = f"drift {self.drift[name]:+.5f}" if name in self.drift else ""
            lines.append(f"  {name:<44}{loss:>10.5f}  {drift}")
        return "\n".join(lines)


REFERENCE = "adapter on the float32 base (not merged)"


def _score(model, rows, collate, batch_size: int) -> tuple[float, int]:
    from qtune.evaluate.perplexity import split_loss

    result = split_loss(model, rows, collate, batch_size)
    return result["loss"], int(result["tokens"])  # a count (split_loss's figures are typed float)


def check_export(
    run_dir: str | Path,
    merged: str | Path | None = None,
    gguf_file: str | Path | None = None,
    rows: int = DEFAULT_CHECK_ROWS,
    max_drift: float = DEFAULT_MAX_DRIFT,
) -> ExportCheck | None:
    """Score the first ``rows`` validation rows of ``run_dir`` with the trained model and with each export.

    Returns:
        The :class:`ExportCheck`, or None when the run holds no prepared validation split (nothing to score).

    Raises:
        QtuneError: ``rows`` below 1, or ``max_drift`` negative.
    """
    from qtune.data.tokenize import padding_collator
    from qtune.model.adapters import load_trained
    from qtune.rundir import RunDir

    if rows < 1:
        raise QtuneError(f"--check-rows {rows}: expected at least 1")
    if not max_drift >= 0:
        raise QtuneError(f"--max-drift {max_drift}: expected a number >= 0")
    rd = RunDir(Path(run_dir)).require_adapter()
    data = _validation_rows(rd.data, rows)
    if data is None:
        return None
    model, tokenizer, cfg = load_trained(rd.root)
    collate = padding_collator(tokenizer)
    bs = cfg.train.eval_batch_size
    check = ExportCheck(rows=len(data), tokens=0, max_drift=max_drift)
    loss, check.tokens = _score(model, data, collate, bs)
    check.losses[f"adapter on the {cfg.quant.quant} base (as trained)"] = loss
    if cfg.quant.quant != "none":
        del model
        gc.collect()
        model, _, _ = load_trained(rd.root, quant="none")
        check.losses[REFERENCE] = _score(model, data, collate, bs)[0]
    else:
        check.losses[REFERENCE] = loss
    del model
    gc.collect()
    reference = check.losses[REFERENCE]
    for name, load in _export_loaders(merged, gguf_file):
        exported = load()
        check.losses[name] = _score(exported, data, collate, bs)[0]
        check.drift[name] = check.losses[name] - reference
        del exported
        gc.collect()
    return check


def _validation_rows(data_dir: Path, rows: int) -> list[dict] | None:
    """The first ``rows`` rows of the run's prepared validation split (without the ``row`` index column), or None
    when the run holds no validation split."""
    from qtune.data.prepare import load_splits

    try:
        splits = load_splits(data_dir)
    except QtuneError:
        return None
    if "val" not in splits:
        return None
    val = splits["val"]
    val = val.remove_columns([c for c in val.column_names if c == "row"]).select(range(min(rows, len(val))))
    return [val[i] for i in range(len(val))]


def _export_loaders(merged: str | Path | None, gguf_file: str | Path | None) -> list[tuple[str, Callable[[], Any]]]:
    """(name in the table, loader) of each export to score, each read back by transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.model.load import device

    exports: list[tuple[str, Callable[[], Any]]] = []
    if merged is not None:
        exports.append(
            (
                "merged model (read back)",
                lambda: AutoModelForCausalLM.from_pretrained(
                    str(merged), dtype=torch.float32, device_map={"": device()}
                ),
            )
        )
    if gguf_file is not None:
        g = Path(gguf_file)
        exports.append(
            (
                "GGUF file (read back by transformers)",
                lambda: AutoModelForCausalLM.from_pretrained(
                    str(g.parent), gguf_file=g.name, dtype=torch.float32, device_map={"": device()}
                ),
            )
        )
    return exports
