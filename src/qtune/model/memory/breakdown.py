"""The estimate: the terms summed into the predicted peak (:class:`MemoryEstimate`, with its JSON and table
forms), and the largest micro-batch that fits a budget (:func:`fit`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qtune.model.memory.counts import ModelCounts
from qtune.model.memory.shape import TrainShape
from qtune.model.memory.terms import (
    Term,
    activation_terms,
    cpu_terms,
    distribute,
    loss_terms,
    training_state_terms,
    weight_terms,
)
from qtune.units import GIB

ALLOCATOR_OVERHEAD = 0.05
"""Reserved/allocated ratio minus one for PyTorch's caching allocator, a heuristic: blocks are rounded up (512 B,
2 MiB segments for large blocks) and freed blocks are kept for reuse (PyTorch docs, "CUDA semantics: memory
management"). Reported apart; not part of ``peak_gib``."""


@dataclass
class MemoryEstimate:
    """Breakdown of predicted peak training memory; ``peak_bytes`` sums the terms with ``in_peak``."""

    shape: TrainShape
    terms: list[Term]
    trainable_params: int
    total_params: int

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.in_peak)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    @property
    def peak_reserved_gib(self) -> float:
        """Predicted peak reserved by PyTorch's CUDA caching allocator: ``peak_gib`` plus
        :data:`ALLOCATOR_OVERHEAD`; on a CPU (peak RSS, no caching allocator) equal to ``peak_gib``."""
        return self.peak_gib * (1 + ALLOCATOR_OVERHEAD) if self.shape.device == "cuda" else self.peak_gib

    def to_dict(self) -> dict:
        """JSON-ready: ``peak_gib`` (predicted peak allocated, or peak RSS on CPU), each term in GiB, inputs."""
        return {
            "peak_gib": round(self.peak_gib, 4),
            "peak_reserved_gib": round(self.peak_reserved_gib, 4),
            "terms_gib": {t.name: round(t.gib, 4) for t in self.terms},
            "not_in_peak": [t.name for t in self.terms if not t.in_peak],
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "inputs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.shape.__dict__.items()},
        }

    def table(self) -> str:
        """The breakdown as aligned text lines (GiB), sources included."""
        rows = [f"{'term':<22} {'GiB':>9}  source"]
        for t in self.terms:
            mark = "" if t.in_peak else f" ({t.why_not_in_peak}; not in peak)"
            rows.append(f"{t.name:<22} {t.gib:>9.3f}  {t.source}{mark}")
        rows.append(
            f"{'peak':<22} {self.peak_gib:>9.3f}  {'peak allocated' if self.shape.device == 'cuda' else 'peak RSS'}"
        )
        if self.shape.device == "cuda":
            rows.append(
                f"{'peak reserved':<22} {self.peak_reserved_gib:>9.3f}  peak allocated + "
                f"{ALLOCATOR_OVERHEAD:.0%} caching-allocator overhead (heuristic); what nvidia-smi shows"
            )
        return "\n".join(rows)


def _check_shape(s: TrainShape) -> None:
    """Raises QtuneError for a shape no run can have (see :func:`estimate`)."""
    from qtune.errors import QtuneError

    if s.r == 0 and s.quantized:
        raise QtuneError(f"r=0 (full fine-tuning) needs a 16/32-bit base, not {s.quant}")
    if s.batch_size < 1 or s.seq_len < 1:
        raise QtuneError("batch size and sequence length must be positive")
    if s.world_size < 1:
        raise QtuneError(f"world size must be at least 1, got {s.world_size}")


def estimate(counts: ModelCounts, s: TrainShape) -> MemoryEstimate:
    """Predict peak training memory for model ``counts`` under ``s``; see :mod:`qtune.model.memory` for the model.

    Raises:
        QtuneError: full fine-tuning (r = 0) of a quantized base, a non-positive batch/sequence length or world
            size, or target modules PEFT rejects.
    """
    _check_shape(s)
    terms = weight_terms(counts, s)
    state, trainable, grad_bytes = training_state_terms(counts, s)
    saved, workspace = activation_terms(counts, s)
    terms += state + saved + loss_terms(counts, s, workspace)
    if s.world_size > 1:
        distribute(terms, counts, s, grad_bytes)
    if s.device == "cpu":
        terms += cpu_terms(counts, s)
    return MemoryEstimate(s, terms, trainable, counts.total_params)


def fit(counts: ModelCounts, s: TrainShape, budget_gib: float, max_seq_len: int | None = None) -> dict:
    """Largest micro-batch that fits ``budget_gib`` at ``s.seq_len``, and at each power-of-two sequence length.

    "Fits" means the predicted peak *reserved* memory (:attr:`MemoryEstimate.peak_reserved_gib`: allocated plus the
    caching allocator's overhead on CUDA) is at most ``budget_gib``, so the allocator's headroom is left.

    Returns:
        {"budget_gib", "seq_len", "max_batch_size" (0: not even batch 1 fits), "table": [{seq_len, max_batch_size,
        peak_gib}]}; the table stops at ``max_seq_len`` (the model's context) when given.
    """

    def largest(seq: int) -> tuple[int, float]:
        def peak(b: int) -> float:
            return estimate(counts, replace(s, batch_size=b, seq_len=seq)).peak_reserved_gib

        if peak(1) > budget_gib:
            return 0, peak(1)
        lo, hi = 1, 2
        while peak(hi) <= budget_gib and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget_gib else (lo, mid)
        return lo, peak(lo)

    b, p = largest(s.seq_len)
    table = []
    seq = 128
    while seq <= (max_seq_len or 8192) and seq <= 1 << 17:
        mb, mp = largest(seq)
        table.append({"seq_len": seq, "max_batch_size": mb, "tokens": mb * seq, "peak_gib": round(mp, 3)})
        seq *= 2
    return {
        "budget_gib": budget_gib,
        "seq_len": s.seq_len,
        "max_batch_size": b,
        "peak_gib": round(p, 3),
        "table": table,
    }
