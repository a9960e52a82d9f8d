"""Validation loss: the one token-weighted loss that every report uses, and the Trainer that logs it.

:func:`split_loss` is the only place a validation or test loss is computed: training's periodic and final
evaluation (``metrics.jsonl`` eval records, ``train_summary.json`` val_loss, hence the sweep's val loss column),
``qtune eval`` (:mod:`qtune.evaluate.perplexity`, base and adapter) and the benchmarks all call it.

The loss is the mean next-token cross-entropy over every supervised token (label != -100) of the split, each token
weighted equally. Each sample is its own forward pass (no padding), so a sample's per-token losses do not depend
on which samples share its batch, and the per-token losses are summed exactly (``math.fsum``), so their order does
not matter either: the figure is bit-identical whatever eval batch size or sample order is asked for. Batches of
padded samples would change the kernels' rounding (SmolLM2-135M NF4 on CPU, 24 validation samples: 1.2725008832
one at a time, 1.2725009121 in batches of 8), and one sample per pass was no slower on CPU (16-17 s vs 21 s;
the whole 101-row split, NF4 base: 58.5 s, against 61.1 s for the earlier batches of 8).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sized
from typing import Any, cast

import torch
from transformers import Trainer

from qtune.data.tokenize import IGNORE_INDEX


@torch.no_grad()
def split_loss(model, dataset, collate, batch_size: int | None = None, progress=None, halves: bool = False) -> dict:
    """Token-weighted mean cross-entropy over the supervised tokens of ``dataset``.

    Args:
        model: a causal LM (or PEFT model) returning ``logits`` [1, K, V] for ``logits_to_keep`` = K positions.
        dataset: a sequence (``datasets.Dataset`` or list) of dicts with input_ids, attention_mask, labels
            (lists of int; labels -100 where not supervised).
        collate: turns a list of rows into tensors of shape [B, T] (:func:`qtune.data.tokenize.padding_collator`);
            it is given one row at a time.
        batch_size: ignored (accepted for older callers): every sample is its own forward pass, so the loss
            cannot depend on a batch size.
        progress: called with the number of samples done after each one (a progress bar's ``update``-like hook).
        halves: also return the loss of each half of ``dataset`` (rows ``[0, ceil(n/2))`` and ``[ceil(n/2), n)``
            in dataset order), from the same forward passes: each half is what ``split_loss`` gives for that
            half alone, without a second pass.

    Returns:
        {"loss": nats per supervised token, "perplexity": exp(loss) (exponent capped at 50),
        "tokens": supervised tokens counted}, with ``halves`` also "halves": [first half, second half], each a
        {"loss", "perplexity", "tokens"}. An empty split gives loss 0.0 over 0 tokens.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    per_row: dict[int, list[float]] = {}  # row -> every supervised token's cross-entropy, float32 values
    # Longest first, so an out-of-memory shows at once; the exact sum makes the order irrelevant to the result.
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    try:
        with no_cpu_repacking(model):
            for done, i in enumerate(order, 1):
                if progress is not None:
                    progress(done)
                batch = collate([dataset[i]])
                next_labels = batch.pop("labels")[0, 1:]  # [T-1]: the label each position predicts
                keep = (next_labels != IGNORE_INDEX).nonzero().squeeze(-1)  # [K] positions with a supervised next
                if keep.numel() == 0:
                    continue
                batch = {k: v.to(dev) for k, v in batch.items()}
                logits = model(**batch, logits_to_keep=keep.to(dev), use_cache=False).logits[0]  # [K, V]
                per_row[i] = torch.nn.functional.cross_entropy(
                    logits.float(), next_labels[keep].to(dev), reduction="none"
                ).tolist()
    finally:
        model.train(was_training)
    result: dict = _token_mean([x for row in per_row.values() for x in row])
    if halves:
        cut = (len(dataset) + 1) // 2
        first = [x for i, row in per_row.items() if i < cut for x in row]
        result["halves"] = [_token_mean(first), _token_mean([x for i, row in per_row.items() if i >= cut for x in row])]
    return result


def _token_mean(losses: list[float]) -> dict[str, float]:
    """{"loss": the exact mean of per-token losses (0.0 for none), "perplexity": exp(loss), exponent capped at
    50, "tokens": how many}."""
    count = len(losses)
    loss = math.fsum(losses) / count if count else 0.0
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@contextlib.contextmanager
def no_cpu_repacking(model) -> Iterator[None]:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference inside the block.

    On a CPU with AVX512-BF16, a ``Linear4bit`` in eval mode without gradients rewrites its weight on first use
    into a CPU layout with the block scales rounded to bfloat16, and a later ``state_dict`` (a checkpoint, the
    adapter save) converts it back with the scales quantized again: evaluation would then see other weights than
    training trained, and training after a periodic evaluation other weights than before it. Inside the block the
    layers keep the layout and scales they were loaded with (the dequantize-and-matmul path training uses).
    Measured on the demo's 101 validation rows, SmolLM2-135M NF4 base: 1.2120 repacked, 1.2122 kept, the figure
    of the exact NF4 round trip in float32 (``bench/quant_sensitivity.py``). Layers already repacked (by
    generation earlier in the same process) stay repacked.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True


@contextlib.contextmanager
def loaded_precision(dtypes: list[tuple[torch.nn.Parameter, torch.dtype]]) -> Iterator[None]:
    """Cast the given parameters back to the dtype they were loaded in, for the duration of the block.

    Training upcasts a quantized base's non-quantized parameters (norms, embeddings, LM head) to float32
    (``peft.prepare_model_for_kbit_training``); a model loaded for ``qtune eval`` has them in the compute dtype.
    The values came from that dtype, so the round trip is exact and evaluation sees the same weights as
    ``qtune eval``. A no-op when nothing was upcast (float32 compute, the CPU default).
    """
    changed = [(p, p.data, dtype) for p, dtype in dtypes if p.dtype != dtype]
    try:
        for p, data, dtype in changed:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data, _ in changed:
            p.data = data


class ValidationTrainer(Trainer):
    """``transformers.Trainer`` whose evaluation is :func:`split_loss` on the in-training model.

    Used for the periodic evaluations (``train.eval_steps``) and the final one, so ``eval_loss`` in the logs,
    ``metrics.jsonl`` and ``train_summary.json`` is the token-weighted figure of ``qtune eval`` for the same
    adapter and split, whatever ``per_device_eval_batch_size`` says. (With Liger-Kernel, CUDA only, the
    in-training model runs Liger's RMSNorm/SwiGLU/RoPE kernels, which round differently from a fresh load.)

    Args (beyond Trainer's):
        eval_collate: the collator :func:`split_loss` gets (a padding collator).
        loaded_dtypes: (parameter, dtype it was loaded in) for the base's parameters, see
            :func:`loaded_precision`.
    """

    def __init__(self, *args, eval_collate, loaded_dtypes=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collate = eval_collate
        self.loaded_dtypes = list(loaded_dtypes)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, Any]:
        """Token-weighted loss of the model on ``eval_dataset`` (default: the Trainer's).

        Every process computes it on the whole split (no collective), so all ranks get the same figure.

        Returns:
            {prefix_loss, prefix_perplexity, prefix_tokens (supervised tokens), prefix_runtime (s)}, also logged
            (callbacks' ``on_log``) and passed to ``on_evaluate``, and prefix_halves (the loss of each half of
            the split, :func:`split_loss` with ``halves``; not logged).
        """
        # one split (a datasets.Dataset): qtune never gives the Trainer a dict of evaluation sets
        dataset = cast(Sized, self.eval_dataset if eval_dataset is None else eval_dataset)
        start = time.perf_counter()
        bar = None
        if self.is_world_process_zero():
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(dataset),
                desc=f"eval (step {self.state.global_step})",
                unit="sample",
                dynamic_ncols=True,
                leave=False,
            )
        try:
            with loaded_precision(self.loaded_dtypes):
                result = split_loss(
                    self.model,
                    dataset,
                    self.eval_collate,
                    progress=(lambda done: bar.update(done - bar.n)) if bar else None,
                    halves=True,
                )
        finally:
            if bar is not None:
                bar.close()
        p = metric_key_prefix
        metrics = {
            f"{p}_loss": result["loss"],
            f"{p}_perplexity": result["perplexity"],
            f"{p}_tokens": result["tokens"],
            f"{p}_runtime": round(time.perf_counter() - start, 3),
        }
        self.log(dict(metrics))  # log() adds epoch and token counts to the dict it gets
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        halves = {f"{p}_halves": result["halves"]} if "halves" in result else {}
        return metrics | halves  # the halves not logged: a list, for train_summary.json
