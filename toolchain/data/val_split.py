"""The validation split carved from the training side (`train.val_fraction`, `train.val_split`).

The test split is evaluated once, at the end; choices (epochs, defaults, ablations) are made on
this split. Two rules:

- spatial: where the training images say where they came from (ImageSet.spatial_group: the
  axial slab of the volume, mri and ct), whole slabs are held out (sampling.py
  spatial_holdout, stratified by class) and the slabs next to them, the guard, are dropped
  from training. Validation and training images then share no voxel and not even
  neighbouring slices, so validation measures generalisation to unseen parts of the volume.
- random: every other image (fashion-mnist, npz, folder; multi-task data: the tasks without
  positions): `fraction` of each class at random (sampling.py holdout_split). For patch data
  this would hold out neighbours of training patches: it watches training, no more.

`auto` takes the spatial rule wherever images have positions and the random rule for the
rest; `spatial` requires positions for every image (a one-line ConfigError otherwise);
`random` ignores positions.

Order of operations: load_task withholds labels first (data.train_fraction), then this split
holds out `fraction` of the LABELLED images (validation labels come out of the label budget;
a withheld-label image never becomes a validation image). The withheld-label images (the
unlabelled transfer set) that lie in a validation or guard slab are dropped too: they are the
validation images' own slices and their neighbours, and a distillation recipe must not train
on them. The random rule leaves the transfer set as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError
from .base import NO_SPATIAL_GROUP, ImageSet, TaskData
from .sampling import GUARD, TRAIN, VALIDATION, holdout_split, slab_roles, spatial_holdout

RULES = ("auto", "spatial", "random")


@dataclass
class ValidationSplit:
    """`task` without the validation and guard images; `val` None when nothing is held out."""

    task: TaskData
    val: ImageSet | None
    rule: str  # "spatial", "random", "spatial+random" (some tasks each) or "none"
    summary: dict  # also recorded as task.provenance["validation_split"]

    def describe(self) -> str:
        """One line for the log."""
        s = self.summary
        if self.val is None:
            return f"validation: none ({s['why']})"
        text = f"validation: {len(self.val)} images, rule {self.rule}"
        if s.get("held_out_slabs"):
            text += (f" ({s['held_out_slabs']} whole slabs held out; {s['guard_dropped']} labelled and "
                     f"{s['unlabelled_dropped']} withheld-label training images in the guard slabs or "
                     "validation slabs dropped)")
        if s.get("classes_without_validation"):
            text += f"; no validation images for {', '.join(s['classes_without_validation'])} (too few slabs)"
        return text


def check_rule(task: TaskData, rule: str) -> None:
    """A one-line ConfigError for an unknown rule, or `spatial` on images without positions."""
    if rule not in RULES:
        raise ConfigError(f"train.val_split must be one of {', '.join(RULES)}, got '{rule}'")
    if rule != "spatial":
        return
    groups = task.train.spatial_group
    if groups is None or len(groups) == 0:
        raise ConfigError(
            f"train.val_split=spatial needs images with a position in their volume (data=mri, data=ct); "
            f"{task.name} has none: use train.val_split=auto or random"
        )
    unplaced = groups == NO_SPATIAL_GROUP
    if unplaced.any():
        names = [t.name for t in task.tasks] if task.tasks else [task.name]
        ids = sorted(set(task.train.task_ids[unplaced].tolist())) if task.train.task_ids is not None else [0]
        raise ConfigError(
            f"train.val_split=spatial needs a position for every image; task(s) "
            f"{', '.join(names[i] for i in ids)} have none: use train.val_split=auto (spatial where possible)"
        )


def split_validation(task: TaskData, fraction: float, seed: int, rule: str = "auto") -> ValidationSplit:
    """Hold out about `fraction` of the labelled training images (module docstring)."""
    check_rule(task, rule)
    if fraction <= 0:
        return ValidationSplit(task, None, "none", {"rule": "none", "why": "train.val_fraction is 0"})
    train = task.train
    labels = train.labels.numpy()
    groups = _groups(train.spatial_group, len(train))
    volumes = None if train.task_ids is None else train.task_ids.numpy()
    labelled = labels >= 0  # an UNLABELLED (-100) image can never be a validation image
    spatial = groups >= 0 if rule != "random" else np.zeros(len(train), dtype=bool)

    held = spatial_holdout(labels[spatial & labelled], groups[spatial & labelled],
                           None if volumes is None else volumes[spatial & labelled], fraction, seed)
    roles = slab_roles(np.where(spatial, groups, NO_SPATIAL_GROUP), volumes, held)
    rest = np.flatnonzero(~spatial & labelled)
    if len(rest):
        _, picked = holdout_split(labels[rest], fraction, seed)
        roles[rest[picked]] = VALIDATION

    used = [name for name, part in (("spatial", spatial & labelled), ("random", ~spatial & labelled)) if part.any()]
    summary = {
        "rule": "+".join(used) or "none",
        "requested": rule,
        "fraction": fraction,
        "validation": int((roles == VALIDATION).sum()),
        "guard_dropped": int((roles == GUARD).sum()),
    }
    unlabelled, unlabelled_ids, unlabelled_groups = task.unlabelled, task.unlabelled_task_ids, task.unlabelled_spatial_group
    dropped = 0
    if "spatial" in used:
        summary["held_out_slabs"] = len(held)
        summary["slabs"] = _slab_listing(task, held)
        if unlabelled is not None and unlabelled_groups is not None:
            keep = slab_roles(unlabelled_groups.numpy(), None if unlabelled_ids is None else unlabelled_ids.numpy(),
                              held) == TRAIN
            dropped = int((~keep).sum())
            keep_t = torch.from_numpy(keep)
            unlabelled = unlabelled[keep_t] if keep.any() else None
            unlabelled_ids = None if unlabelled_ids is None or unlabelled is None else unlabelled_ids[keep_t]
            unlabelled_groups = None if unlabelled is None else unlabelled_groups[keep_t]
        summary["unlabelled_dropped"] = dropped
        summary["classes_without_validation"] = _missing_classes(task, labels, roles, spatial & labelled)

    val = train.subset(torch.from_numpy(np.flatnonzero(roles == VALIDATION)))
    if not len(val):
        summary.update(rule="none", why="no class has enough images, or enough slabs, to hold any out")
        return ValidationSplit(task, None, "none", summary)
    summary["split_rule"] = _rule_text(summary)
    provenance = {**task.provenance, "validation_split": summary,
                  "split_rule": f"{task.provenance.get('split_rule', 'as loaded')}; {summary['split_rule']}"}
    kept = replace(task, train=train.subset(torch.from_numpy(np.flatnonzero(roles == TRAIN))), provenance=provenance,
                   unlabelled=unlabelled, unlabelled_task_ids=unlabelled_ids, unlabelled_spatial_group=unlabelled_groups)
    return ValidationSplit(kept, val, summary["rule"], summary)


def _groups(spatial_group: torch.Tensor | None, n: int) -> np.ndarray:
    return np.full(n, NO_SPATIAL_GROUP, dtype=np.int64) if spatial_group is None else spatial_group.numpy()


def _slab_listing(task: TaskData, held: np.ndarray) -> dict[str, list[int]]:
    """Held-out slab numbers per task (single-task data: under its own name)."""
    names = [t.name for t in task.tasks] if task.tasks else [task.name]
    listing: dict[str, list[int]] = {}
    for volume, group in held.tolist():
        listing.setdefault(names[volume], []).append(group)
    return listing


def _missing_classes(task: TaskData, labels: np.ndarray, roles: np.ndarray, spatial: np.ndarray) -> list[str]:
    """Spatially split classes with training images but no validation images."""
    present = set(labels[spatial].tolist())
    in_val = set(labels[spatial & (roles == VALIDATION)].tolist())
    return [task.class_names[c] if c < len(task.class_names) else f"class_{c}" for c in sorted(present - in_val)]


def _rule_text(summary: dict) -> str:
    parts = []
    if "spatial" in summary["rule"]:
        parts.append(f"{summary['held_out_slabs']} whole axial slabs of the training side held out, the slab on "
                     f"either side of each dropped from training ({summary['guard_dropped']} labelled, "
                     f"{summary['unlabelled_dropped']} withheld-label images): no shared voxel or neighbouring slice")
    if "random" in summary["rule"]:
        which = "images without a position" if "spatial" in summary["rule"] else "images"
        parts.append(f"{which} per class at random (patches from one volume: neighbours of training patches)")
    return (f"validation ({summary['validation']} labelled training images, train.val_split="
            f"{summary['requested']}): " + "; ".join(parts))
