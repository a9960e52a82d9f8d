"""Deterministic train/validation/test split."""

from __future__ import annotations

import random

SPLITS = ("train", "val", "test")
"""The names of a run's prepared splits."""


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train/val/test by ``fractions``.

    Val and test get ``round(n * fraction)`` items each (at least 1 when their fraction is positive and n >= 3);
    train gets the rest. The same (n, fractions, seed) always gives the same split.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = []
    for frac in fractions[1:]:
        k = round(n * frac)
        if frac > 0 and k == 0 and n >= 3:
            k = 1
        sizes.append(k)
    n_val, n_test = sizes
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }
