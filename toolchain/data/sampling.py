"""Stratified, seeded subsampling and splitting of labelled examples.

Every function shuffles each class once with a generator derived from (seed, purpose) and
takes a prefix of that shuffle, so results are deterministic given the seed and nested:
with the same seed, `train_fraction=0.1` keeps a subset of what `train_fraction=0.5` keeps.
Returned indices are sorted, so the original order of the data is preserved.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

# Distinct streams so that e.g. capping the test split does not reuse the train shuffle.
PURPOSE = {"max_train": 1, "max_test": 2, "train_fraction": 3, "holdout": 4}


def class_shuffles(labels: np.ndarray, seed: int, purpose: str) -> dict[int, np.ndarray]:
    """For each class present, the indices of its examples in a seeded random order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, PURPOSE[purpose]])
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def stratified_cap(labels: np.ndarray, max_count: int, seed: int, purpose: str) -> np.ndarray:
    """At most `max_count` indices with class proportions kept (largest remainder rounding)."""
    labels = np.asarray(labels)
    if max_count >= len(labels):
        return np.arange(len(labels))
    shuffles = class_shuffles(labels, seed, purpose)
    if max_count < len(shuffles):
        raise UserError(
            f"data.{purpose}={max_count} is smaller than the number of classes ({len(shuffles)}); "
            "raise it so every class keeps at least one example"
        )
    sizes = {c: len(idx) for c, idx in shuffles.items()}
    quotas = _proportional_quotas(sizes, max_count)
    return np.sort(np.concatenate([shuffles[c][: quotas[c]] for c in shuffles]))


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """`fraction` of each class (rounded half up, at least one example per class)."""
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    shuffles = class_shuffles(labels, seed, "train_fraction")
    keep = [idx[: max(1, math.floor(fraction * len(idx) + 0.5))] for idx in shuffles.values()]
    return np.sort(np.concatenate(keep))


def holdout_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class train/test split; every class with >= 2 examples lands in both splits."""
    labels = np.asarray(labels)
    train, test = [], []
    for idx in class_shuffles(labels, seed, "holdout").values():
        n_test = min(max(1, math.floor(test_fraction * len(idx) + 0.5)), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _proportional_quotas(sizes: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` over classes in proportion to `sizes`, each class >= 1 and <= its size."""
    n = sum(sizes.values())
    exact = {c: total * s / n for c, s in sizes.items()}
    quotas = {c: max(1, math.floor(e)) for c, e in exact.items()}
    # Hand out (or take back, if the >= 1 floor overshot) one at a time, fairest first.
    while sum(quotas.values()) < total:
        c = max((c for c in sizes if quotas[c] < sizes[c]), key=lambda c: exact[c] - quotas[c])
        quotas[c] += 1
    while sum(quotas.values()) > total:
        c = max((c for c in sizes if quotas[c] > 1), key=lambda c: quotas[c] - exact[c])
        quotas[c] -= 1
    return quotas
