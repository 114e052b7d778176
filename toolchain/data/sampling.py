"""Stratified, seeded subsampling and splitting of labelled examples.

Every function shuffles each class once with a generator derived from (seed, purpose) and
takes a prefix of that shuffle, so results are deterministic given the seed and nested:
with the same seed, `train_fraction=0.1` keeps a subset of what `train_fraction=0.5` keeps.
Returned indices are sorted, so the original order of the data is preserved.

`spatial_holdout` is the exception to "shuffle each class": it holds out whole slabs of a
volume (ImageSet.spatial_group), so it walks the slabs, not the images, in a seeded order.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

# Distinct streams so that e.g. capping the test split does not reuse the train shuffle.
PURPOSE = {"max_train": 1, "max_test": 2, "train_fraction": 3, "holdout": 4, "spatial_holdout": 5}

# What spatial_holdout makes of each image (slab_roles).
TRAIN, VALIDATION, GUARD = 0, 1, 2


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


def spatial_holdout(labels: np.ndarray, groups: np.ndarray, volumes: np.ndarray | None,
                    fraction: float, seed: int) -> np.ndarray:
    """Slabs to hold out for validation: an S x 2 array of (volume, spatial group) pairs.

    `groups` (ImageSet.spatial_group, NO_SPATIAL_GROUP = -1 for none) numbers the slab of each
    image; `volumes` (task ids on multi-task data, None = one volume) says which volume the
    number refers to. Only images with a slab take part; slab_roles() then says, per image,
    whether it is validation, guard (a slab next to a validation slab, kept out of training so
    that validation and training images are at least one slab apart) or training.

    Stratified, in two passes. (1) Walk the slabs in a seeded order and take a slab where it
    brings more images of classes still short of their share (`fraction` of the class,
    rounded half up, at least 1) than images beyond it; after taking one, try its neighbours
    next, since adjoining validation slabs share guard slabs. (2) A class left below half its
    share gets the slabs that help it most. Slabs hold several classes, so the result is about
    `fraction` overall, not exactly, and per class it varies (bench/validation_split.py
    measures both). A slab is never taken if that would leave a class that has training
    images with none (validation slab or guard): a class whose images all lie in one slab,
    or two neighbours, stays in training only.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    volumes = np.zeros_like(groups) if volumes is None else np.asarray(volumes)
    placed = groups >= 0
    if fraction <= 0 or not placed.any():
        return np.zeros((0, 2), dtype=np.int64)
    units, unit_of = np.unique(np.stack([volumes[placed], groups[placed]], 1), axis=0, return_inverse=True)
    classes, class_of = np.unique(labels[placed], return_inverse=True)
    counts = np.zeros((len(units), len(classes)), dtype=np.int64)
    np.add.at(counts, (unit_of.ravel(), class_of.ravel()), 1)
    totals = counts.sum(0)
    target = np.maximum(1, np.floor(fraction * totals + 0.5)).astype(np.int64)
    # Each slab with its neighbours (same volume, group +- 1) that hold images.
    index = {tuple(u): i for i, u in enumerate(units.tolist())}
    around = [[i] + [index[(v, g + d)] for d in (-1, 1) if (v, g + d) in index] for i, (v, g) in enumerate(units.tolist())]

    held = np.zeros(len(units), dtype=bool)

    def training_left(out: np.ndarray) -> np.ndarray:
        """Per class: the images neither in a slab of `out` nor next to one."""
        lost = np.zeros(len(units), dtype=bool)
        for i in np.flatnonzero(out):
            lost[around[i]] = True
        return totals - counts[lost].sum(0)

    def allowed(u: int) -> bool:
        """Holding out slab u too leaves every class that has training images some."""
        more = held.copy()
        more[u] = True
        return bool((training_left(more) >= np.minimum(training_left(held), 1)).all())

    order = np.random.default_rng([seed, PURPOSE["spatial_holdout"]]).permutation(len(units))
    # After taking a slab, try its neighbours next: adjoining validation slabs share their guard
    # slabs, so runs cost fewer training images than scattered slabs.
    pending, tried = list(order), np.zeros(len(units), dtype=bool)
    while pending:
        u = pending.pop(0)
        if tried[u]:
            continue
        tried[u] = True
        short = np.maximum(target - counts[held].sum(0), 0)
        if not short.any():
            break
        wanted = np.minimum(counts[u], short).sum()
        if wanted > counts[u].sum() - wanted and allowed(u):
            held[u] = True
            pending[:0] = [i for i in around[u][1:] if not tried[i]]
    # Then every class short of half its share (at least 1 image) gets the slabs that help it
    # most, neediest class first: the walk can pass over a class whose slabs are crowded.
    least = np.ceil(target / 2)
    for c in np.argsort(counts[held].sum(0) / target, kind="stable"):
        while totals[c] >= 2 and counts[held, c].sum() < least[c]:
            short = np.maximum(target - counts[held].sum(0), 0)
            best, best_score = None, None
            for u in order:  # seeded order: ties go to the earlier slab
                if held[u] or counts[u, c] == 0 or not allowed(u):
                    continue
                wanted = np.minimum(counts[u], short).sum()
                score = wanted - (counts[u].sum() - wanted)
                if best is None or score > best_score:
                    best, best_score = u, score
            if best is None:
                break  # no slab of this class can go without emptying some class's training
            held[best] = True
    return units[held]


def slab_roles(groups: np.ndarray, volumes: np.ndarray | None, held_out: np.ndarray) -> np.ndarray:
    """Per image: VALIDATION (its slab is held out), GUARD (a neighbour of a held-out slab) or
    TRAIN (every other image, including those with no slab)."""
    groups = np.asarray(groups)
    volumes = np.zeros_like(groups) if volumes is None else np.asarray(volumes)
    held = {tuple(u) for u in np.asarray(held_out).tolist()}
    roles = np.full(len(groups), TRAIN, dtype=np.int64)
    for i, (v, g) in enumerate(zip(volumes.tolist(), groups.tolist())):
        if g < 0:
            continue
        if (v, g) in held:
            roles[i] = VALIDATION
        elif (v, g - 1) in held or (v, g + 1) in held:
            roles[i] = GUARD
    return roles


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
