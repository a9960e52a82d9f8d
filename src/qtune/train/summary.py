"""The summary of a finished training run (:class:`TrainSummary`), as ``train_summary.json`` holds it.

The final save writes it last, so its presence marks a run finished (:meth:`qtune.rundir.RunDir.is_finished`).
Its keys and values are the fields below, in this order; ``peak_allocated_gib`` and ``peak_reserved_gib`` (CUDA
only), ``resumed_from_step`` (a resumed run only) and ``compute_dtype`` (absent from summaries written before
it was recorded) are written only when set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from qtune.errors import QtuneError

_ONLY_WHEN_SET = ("peak_allocated_gib", "peak_reserved_gib", "resumed_from_step", "compute_dtype", "val_halves")
"""Fields left out of the JSON when they are None (a CPU run, a run not resumed, a summary written before
compute_dtype or val_halves was recorded)."""


@dataclass(frozen=True)
class TrainSummary:
    """Figures of one training run.

    Attributes:
        run_dir: the run directory.
        steps: optimizer steps trained, since step 0 (a resumed run counts the steps before its checkpoint).
        world_size: processes that trained; ``global_batch_size``: sequences per optimizer step, all processes.
        wall_time_s: seconds of training (this session's, when resumed), evaluation at the end excluded.
        train_tokens: non-padding input tokens seen since step 0.
        tokens_per_s: ``train_tokens`` per second of ``wall_time_s``; resumed: this session's tokens alone, None
            when it trained no step.
        first_train_loss, final_train_loss: the first and last logged training loss (None: none logged).
        val_loss, val_perplexity, val_tokens: the token-weighted validation loss after the last step, as
            ``qtune eval`` computes it (:func:`qtune.train.validation.split_loss`), its perplexity and the
            supervised tokens counted; None without a validation split or with ``train.eval_at_end`` off.
        trainable_params, total_params: parameters of the model with its adapter.
        peak_rss_gib, peak_allocated_gib, peak_reserved_gib: peak memory, GiB
            (:func:`qtune.train.callbacks.peak_memory`; the last two on CUDA only).
        resumed_from_step: the checkpoint's step a resumed run continued from (None: not resumed).
        compute_dtype: the dtype the matmuls ran in ("float32", "bfloat16", "float16"): ``quant.compute_dtype``
            resolved on the machine that trained (``auto`` depends on it, :func:`qtune.model.quantize.compute_dtype`).
        val_halves: the final validation loss of each half of the val split (rows ``[0, ceil(n/2))`` and the
            rest), from the same pass as ``val_loss``: two {"loss", "perplexity", "tokens"} (None without it).
    """

    run_dir: str
    steps: int
    world_size: int
    global_batch_size: int
    wall_time_s: float
    train_tokens: int
    tokens_per_s: float | None
    first_train_loss: float | None
    final_train_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    val_tokens: int | None
    trainable_params: int
    total_params: int
    peak_rss_gib: float
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    resumed_from_step: int | None = None
    compute_dtype: str | None = None
    val_halves: list[dict] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``train_summary.json``: every field in order, but those of ``_ONLY_WHEN_SET`` only
        when set."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if not (k in _ONLY_WHEN_SET and v is None)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainSummary:
        """The summary in a parsed ``train_summary.json`` object; keys it does not know are ignored.

        Raises:
            QtuneError: not an object, or a field without a default missing.
        """
        if not isinstance(data, Mapping):
            raise QtuneError(f"not a qtune training summary (a JSON {type(data).__name__}, not an object)")
        known = fields(cls)
        missing = [f.name for f in known if f.default is MISSING and f.name not in data]
        if missing:
            raise QtuneError(f"not a qtune training summary (no {', '.join(missing)})")
        return cls(**{f.name: data[f.name] for f in known if f.name in data})

    @classmethod
    def read(cls, path: str | Path) -> TrainSummary:
        """The summary in the file ``path`` (a run's ``train_summary.json``).

        Raises:
            QtuneError: the file cannot be read, is not JSON, or is not a training summary (:meth:`from_json`).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise QtuneError(f"{path}: cannot read ({e.strerror or e})") from None
        except ValueError as e:
            raise QtuneError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_json(data)
        except QtuneError as e:
            raise QtuneError(f"{path}: {e}") from None
