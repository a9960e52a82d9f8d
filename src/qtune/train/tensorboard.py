"""TensorBoard logging of a run: the Trainer's per-step logs (loss, learning rate, grad norm, tokens seen) and the
validation loss, written to ``RUN/tensorboard`` so they outlive the checkpoints folder the Trainer would use.

Open with ``tensorboard --logdir RUN/tensorboard`` (or a sweep's ``runs/`` folder to compare runs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.errors import QtuneError

if TYPE_CHECKING:
    from transformers.integrations import TensorBoardCallback


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_callback(report_to: str, log_dir: Path) -> TensorBoardCallback | None:
    """A ``transformers`` ``TensorBoardCallback`` writing to ``log_dir``, or None.

    Args:
        report_to: ``train.report_to``: "auto" (TensorBoard when installed), "tensorboard" or "none".

    Raises:
        QtuneError: "tensorboard" asked for but the package is not installed.
    """
    if report_to == "none" or (report_to == "auto" and not tensorboard_available()):
        return None
    if not tensorboard_available():
        raise QtuneError(
            "train.report_to: tensorboard needs the tensorboard package (pip install tensorboard), "
            "or set train.report_to=none"
        )
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    # The callback opens its writer at the start of training and again for an evaluation after the end (a second
    # events file in the same folder); its default folder lies inside the checkpoints, which are deleted.
    callback.logging_dir = str(log_dir)
    return callback
