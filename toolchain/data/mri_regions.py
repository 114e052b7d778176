"""data=mri-regions: Colin27 T1 patches labelled by AAL region, left and right merged.

The vocabulary task of the vision-language recipes (recipe=ogkd): many fine classes with
anatomical names, enough for a base-to-novel split. Same volume, patch extraction and
hemisphere split as data=mri (mri.py: train = left hemisphere, test = right, mirrored, zero
shared voxels); the class is the AAL region of the centre voxel with its _L/_R suffix dropped
(the split is by hemisphere, so each class needs both sides).

Patches are PATCH_MM = 24 mm (data=mri: 32 mm) so that regions near the midline keep
candidate centres: a footprint must lie wholly on one side, so a centre sits at least
PATCH_MM / 2 + 1 mm from the midline. A region is kept when each hemisphere has at least
MIN_CENTRES candidate centres; the others (the vermis, on the midline, and a few small medial
regions) are listed in the provenance as dropped. Classes are ordered as in aal.nii.txt.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .base import TaskData
from .config import DataConfig
from .mri import GROUPS, MIDLINE_GAP, aal_group, patch_sets, plan_centres, read_mri_volume, side_candidates
from .region_text import LOBES, merged_name, readable_name

PATCH_MM = 24
TRAIN_PER_CLASS = 48
TEST_PER_CLASS = 24
MIN_CENTRES = TEST_PER_CLASS


def region_classes(names: dict[int, str]) -> tuple[list[str], dict[int, int]]:
    """(merged AAL names in atlas order, AAL label -> class index)."""
    order: list[str] = []
    label_to_class = {}
    for label in sorted(names):
        merged = merged_name(names[label])
        if merged not in order:
            order.append(merged)
        label_to_class[label] = order.index(merged)
    return order, label_to_class


def class_volume(labels: np.ndarray, label_to_class: dict[int, int], kept: list[int]) -> np.ndarray:
    """Per voxel: position in `kept` + 1 of its class, 0 outside AAL or for a dropped class."""
    position = {cls: i + 1 for i, cls in enumerate(kept)}
    lookup = np.zeros(max(label_to_class) + 1, dtype=np.int16)
    for label, cls in label_to_class.items():
        lookup[label] = position.get(cls, 0)
    return lookup[labels]


def load_mri_regions(cfg: DataConfig) -> TaskData:
    volume = read_mri_volume(cfg.path, cfg.intensity)
    merged, label_to_class = region_classes(volume.names)
    every = class_volume(volume.labels, label_to_class, list(range(len(merged))))
    pools = side_candidates(volume, every, PATCH_MM)
    counts = {split: np.bincount(every[tuple(pool.T)], minlength=len(merged) + 1)[1:] for split, pool in pools.items()}
    kept = [c for c in range(len(merged)) if min(counts["train"][c], counts["test"][c]) >= MIN_CENTRES]
    if len(kept) < 2:
        raise UserError(f"only {len(kept)} AAL regions have {MIN_CENTRES} patch centres in each hemisphere; "
                        f"is {volume.sources[1]} the AAL atlas on the T1's grid?")
    groups = class_volume(volume.labels, label_to_class, kept)
    class_names = [readable_name(merged[c]) for c in kept]
    centres = plan_centres(volume, cfg.seed, PATCH_MM, {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS},
                           groups=groups, names=class_names)
    image_size = cfg.image_size or PATCH_MM
    sets = patch_sets(volume, centres, groups, PATCH_MM, image_size)
    first_label = {c: min(label for label, k in label_to_class.items() if k == c) for c in kept}
    return TaskData(
        name="mri-regions",
        train=sets["train"],
        test=sets["test"],
        class_names=class_names,
        provenance={
            "source": ", ".join(volume.sources),
            "split_rule": ("train = left-hemisphere patches, test = right-hemisphere patches (mirrored); "
                           f"footprints never cross the midline, {MIDLINE_GAP} voxel columns apart: "
                           "zero shared voxels"),
            "patch": f"axial {PATCH_MM} x {PATCH_MM} mm of the Colin27 T1, resized to {image_size}",
            "label": "AAL region of the centre voxel, left and right merged",
            "dropped_regions": {merged[c]: {"train_centres": int(counts["train"][c]),
                                            "test_centres": int(counts["test"][c])}
                                for c in range(len(merged)) if c not in kept},
            "min_centres_per_side": MIN_CENTRES,
            # The region's lobe, in words: the text side of the vision-language recipes.
            "class_lobe": {class_names[i]: LOBES[GROUPS[aal_group(volume.names[first_label[c]])]]
                           for i, c in enumerate(kept)},
            "intensity": volume.intensity,
        },
    )
