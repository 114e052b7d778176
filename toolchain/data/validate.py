"""The checks every data set passes after loading, whatever its source (load_task runs them).

Labels:
  - UNLABELLED (-100, medkd.recipes.base) in the training split is a withheld label (the
    data-scarce setting): it is no class and is kept as it is. Test images need their label.
  - The classes are the labels that occur in the data. When an id up to the largest occurs
    nowhere (sparse ids such as {0, 100000}), the labels are renumbered 0..K-1 in ascending
    order of the original id instead of building a model with an output for every unused id.
    Names are kept (the default name class_<label> carries the original id), and
    provenance["original_labels"] lists the original label of each new id.
  - The training split needs at least two classes: with one, every prediction is right and a
    run would report "100 % accuracy" for a model that learnt nothing.
  - A test class that training lacks can never be predicted, so it is an error unless
    data.allow_unseen_test_classes=true (the class then gets a model output all the same).
Images: any NaN or infinite value is an error naming the split, the count and the first index
(the index within that split as loaded, before max_train/max_test).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from medkd.recipes.base import UNLABELLED

from ..errors import UserError
from .base import TaskData

_CHUNK = 4096


def validate_task(task: TaskData, allow_unseen_test_classes: bool = False) -> TaskData:
    """`task` with contiguous labels, or a UserError naming what is wrong with it."""
    train, test = task.train.labels, task.test.labels
    _check_label_values(task.name, train, test)
    names = task.class_names
    train_ids = np.unique(train[train != UNLABELLED].numpy())
    test_ids = np.unique(test.numpy())
    largest = max(train_ids.max(initial=-1), test_ids.max(initial=-1))
    if names and largest >= len(names):
        raise UserError(f"{task.name}: label {largest} has no class name ({len(names)} names given)")

    def name(label: int) -> str:
        return names[label] if names else f"class_{label}"

    if len(train_ids) < 2:
        found = f"only class '{name(int(train_ids[0]))}'" if len(train_ids) else "no labelled image"
        raise UserError(
            f"{task.name}: the training split has {found}; a classifier needs at least two classes "
            "(with one, every prediction is trivially right)"
        )
    unseen = np.setdiff1d(test_ids, train_ids)
    if len(unseen) and not allow_unseen_test_classes:
        counts = [int((test == int(label)).sum()) for label in unseen]
        listed = ", ".join(f"'{name(int(label))}' ({n} images)" for label, n in zip(unseen, counts))
        raise UserError(
            f"{task.name}: the test split has class(es) {listed} that the training split lacks; "
            "the model could never predict them: add training images of these classes, drop "
            "them from the test split, or set data.allow_unseen_test_classes=true"
        )
    check_finite(task.name, "train", task.train.images)
    check_finite(task.name, "test", task.test.images)
    if task.unlabelled is not None:
        check_finite(task.name, "unlabelled", task.unlabelled)

    classes = np.union1d(train_ids, test_ids)
    provenance = dict(task.provenance)
    if len(unseen):
        provenance["unseen_test_classes"] = [name(int(label)) for label in unseen]
    if np.array_equal(classes, np.arange(len(names) or len(classes))):
        return TaskData(task.name, task.train, task.test, [name(int(c)) for c in classes],
                        provenance, task.unlabelled)
    provenance["original_labels"] = classes.tolist()
    return TaskData(
        task.name,
        replace(task.train, labels=_renumber(train, classes)),
        replace(task.test, labels=_renumber(test, classes)),
        [name(int(c)) for c in classes],
        provenance,
        task.unlabelled,
    )


def _check_label_values(dataset: str, train: torch.Tensor, test: torch.Tensor) -> None:
    if (test == UNLABELLED).any():
        raise UserError(
            f"{dataset}: {int((test == UNLABELLED).sum())} test image(s) have no label "
            f"({UNLABELLED}); every test image needs its class"
        )
    for split, labels in (("train", train[train != UNLABELLED]), ("test", test)):
        if len(labels) and int(labels.min()) < 0:
            raise UserError(f"{dataset}: the {split} split has negative label {int(labels.min())}")


def _renumber(labels: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
    """Original label -> its index in the sorted `classes`; UNLABELLED stays UNLABELLED."""
    known = labels != UNLABELLED
    out = labels.clone()
    out[known] = torch.from_numpy(np.searchsorted(classes, labels[known].numpy())).to(labels.dtype)
    return out


def check_finite(dataset: str, split: str, images: torch.Tensor) -> None:
    nan, inf = [], []
    for start in range(0, len(images), _CHUNK):  # chunks: no full-size boolean copy
        flat = images[start : start + _CHUNK].reshape(-1, images[0].numel())
        nan.append(torch.isnan(flat).any(1))
        inf.append(torch.isinf(flat).any(1))
    problems = []
    for kind, bad in (("NaN", nan), ("infinite", inf)):
        index = torch.nonzero(torch.cat(bad)) if bad else torch.empty(0)
        if len(index):
            problems.append(f"{len(index)} image(s) with {kind} values (first: index {int(index[0])})")
    if problems:
        raise UserError(f"{dataset}: the {split} split has {' and '.join(problems)}; fix or remove them")
