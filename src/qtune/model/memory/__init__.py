"""The analytic memory model: peak training memory of a (quantized) LLaMA-family model + LoRA, from its config.

No weights are read. The model is built on PyTorch's ``meta`` device from its ``config.json`` (shapes only, no
storage), its parameters and buffers are counted module by module, and PEFT attaches the adapter to that meta
model, so the trainable-parameter count is PEFT's own. Each term of :class:`MemoryEstimate` is in bytes and names
its source; the units of the public figures are GiB (2**30 bytes).

Peak allocated memory, the figure ``torch.cuda.max_memory_allocated`` reports, is modelled as

    static (frozen weights + 16->32-bit upcast + quantization constants + trainable params + grads + optimizer)
    + activations saved for the backward pass (all layers, or only the layer inputs under checkpointing)
    + autocast weight copies kept for the backward pass
    + max(logits/loss phase, one layer's backward workspace)

because the cross-entropy buffers over the vocabulary are freed before the backward pass reaches the last
decoder layer. Allocator overhead (reserved minus allocated) is reported apart and is not in ``peak_gib``.
On CPU (peak resident set size) two terms are added: the interpreter, libraries, tokenizer and splits, and the
pages of the memory-mapped checkpoint that loading a quantized model leaves resident. CPU figures assume glibc's
fixed mmap threshold that ``qtune sweep`` sets (:data:`qtune.study.sweep.MMAP_THRESHOLD`); with glibc's default
dynamic threshold the heap keeps freed activations and peak RSS is higher.

The inputs (:class:`TrainShape`) are those of a :class:`qtune.config.RunConfig`: build them with
:meth:`TrainShape.from_config` (or :func:`run_config_inputs`), so an estimate counts the run ``qtune train`` would
launch; the fields a run config also has take its defaults.

The package, by concern: :mod:`~qtune.model.memory.shape` (the inputs), :mod:`~qtune.model.memory.counts` (the
model's parameters, counted on the meta device), :mod:`~qtune.model.memory.storage` (bytes per tensor as
bitsandbytes and the optimizers store it), :mod:`~qtune.model.memory.terms` (the lines of the breakdown),
:mod:`~qtune.model.memory.breakdown` (their sum, :func:`estimate` and :func:`fit`); the functions below estimate
the run a config describes.
"""

from __future__ import annotations

from qtune.model.memory.breakdown import ALLOCATOR_OVERHEAD, MemoryEstimate, estimate, fit
from qtune.model.memory.counts import ModelCounts, count_model, load_model_config, peft_trainable, trainable_tensors
from qtune.model.memory.shape import DTYPE_BYTES, Device, Strategy, TrainShape, effective_optim
from qtune.model.memory.storage import (
    BNB_MIN_8BIT_SIZE,
    BNB_OPTIM_BLOCKSIZE,
    BNB_PAGED_MIN_SIZE,
    BNB_QMAP_BYTES,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
    optimizer_state_bytes,
    quant_constant_bytes,
    quantized_weight_bytes,
)
from qtune.model.memory.terms import CPU_RUNTIME_BYTES, Term

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "BNB_MIN_8BIT_SIZE",
    "BNB_OPTIM_BLOCKSIZE",
    "BNB_PAGED_MIN_SIZE",
    "BNB_QMAP_BYTES",
    "CPU_RUNTIME_BYTES",
    "DTYPE_BYTES",
    "NESTED_BLOCKSIZE",
    "NF4_BLOCKSIZE",
    "Device",
    "MemoryEstimate",
    "ModelCounts",
    "Strategy",
    "Term",
    "TrainShape",
    "count_model",
    "effective_optim",
    "estimate",
    "estimate_run_config",
    "fit",
    "load_model_config",
    "optimizer_state_bytes",
    "peft_trainable",
    "prepared_split_stats",
    "quant_constant_bytes",
    "quantized_weight_bytes",
    "run_config_inputs",
    "trainable_tensors",
    "training_split_stats",
]


def training_split_stats(train) -> tuple[int, float]:
    """(tokens of the longest sample, supervised tokens / all tokens) of a tokenized training split (columns
    ``input_ids`` and ``labels``, -100 marking unsupervised positions): the ``seq_len`` and ``supervised_share``
    of :meth:`TrainShape.from_config` for a run on that split."""
    total = sum(len(x) for x in train["input_ids"])
    supervised = sum(sum(1 for t in lab if t != -100) for lab in train["labels"])
    return max(len(x) for x in train["input_ids"]), supervised / max(total, 1)


def prepared_split_stats(cfg) -> tuple[int, float]:
    """:func:`training_split_stats` of the training split ``qtune train`` would prepare for ``cfg``: the data is
    read, cleaned, tokenized with the model's tokenizer and split as in training, in a temporary directory that is
    removed afterwards. The split is deterministic (``data.seed``), so a run of ``cfg`` trains on the same one.

    Raises:
        QtuneError: the model's tokenizer or the data cannot be loaded (see
            :func:`qtune.data.prepare.prepare_dataset`).
    """
    import tempfile

    from qtune.data.prepare import prepare_dataset
    from qtune.model.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model, require_weights=False), cfg.model)
    with tempfile.TemporaryDirectory(prefix="qtune-estimate-") as tmp:
        splits, _ = prepare_dataset(cfg.data, tokenizer, tmp)
        return training_split_stats(splits["train"])


def run_config_inputs(
    cfg,
    seq_len: int | None = None,
    device: Device | None = None,
    supervised_share: float | None = None,
    world_size: int = 1,
    strategy: Strategy = "ddp",
) -> tuple[ModelCounts, TrainShape]:
    """Model counts and training shape of a :class:`qtune.config.RunConfig`: the model config as ``cfg.model``
    names it (no weights), counted with ``quant.skip_modules``, and :meth:`TrainShape.from_config` (see there for
    the arguments).

    Raises:
        QtuneError: the model config cannot be read, or a skip module names no linear layer.
    """
    shape = TrainShape.from_config(cfg, seq_len, device, supervised_share, world_size, strategy)
    return count_model(load_model_config(cfg.model), tuple(cfg.quant.skip_modules)), shape


def estimate_run_config(
    cfg,
    seq_len: int | None = None,
    device: Device | None = None,
    supervised_share: float | None = None,
    world_size: int = 1,
    strategy: Strategy = "ddp",
) -> MemoryEstimate:
    """Estimate for a :class:`qtune.config.RunConfig`; see :func:`run_config_inputs`. ``qtune estimate --config``
    and ``qtune sweep`` both call this, so they print and record the same breakdown for the same inputs."""
    return estimate(*run_config_inputs(cfg, seq_len, device, supervised_share, world_size, strategy))
