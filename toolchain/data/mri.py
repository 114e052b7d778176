"""The embedded default task: brain-region group of 2D patches from the Colin27 T1 MRI.

Real data from Debian `mricron-data` (see mri_volume.py). Each example is an axial patch of
PATCH_MM x PATCH_MM voxels (1 mm) of the intensity-normalised T1, resized to image_size,
centred on a voxel that the AAL atlas labels; its class is the lobar group of that voxel:

    frontal        Precentral, Frontal_*, Rolandic_Oper, Supp_Motor_Area, Olfactory, Rectus
    insula-limbic  Insula, Cingulum_*, Hippocampus, ParaHippocampal, Amygdala
    occipital      Calcarine, Cuneus, Lingual, Occipital_*, Fusiform
    parietal       Postcentral, Parietal_*, SupraMarginal, Angular, Precuneus, Paracentral_Lobule
    subcortical    Caudate, Putamen, Pallidum, Thalamus
    temporal       Heschl, Temporal_*
    cerebellum     Cerebelum_*, Vermis_*

This follows the lobe digit of the AAL codes in aal.nii.txt (2xxx frontal, 3xxx insula,
4xxx limbic, 5xxx occipital, 6xxx parietal, 7xxx deep grey, 8xxx temporal, 9xxx cerebellum),
with insula and limbic merged. The AAL labels only grey matter, so white matter is never a
patch centre.

Split rule (spatially disjoint): train patches come from the left hemisphere, test patches
from the right. Every patch's voxel footprint lies wholly on its own side of the midline
(x = 0 mm) with MIDLINE_GAP voxels between them, so no test patch shares a voxel with a
train patch. Hemispheres rather than axial slabs because every lobar group exists in both
hemispheres, while the deep grey nuclei span only ~30 mm of z, too little for train and test
slabs separated by a gap. Right-hemisphere patches are mirrored left-right, so every patch
shows its medial side on the right: the test measures anatomy, not mirror invariance.

Validation slabs: each training patch carries spatial_group = its slice // SLAB_MM (base.py),
so a validation split (train.val_split, sampling.py spatial_holdout) can hold out whole axial
slabs with a guard slab either side that trains nothing. Patches are 2D axial, so patches on
different slices share no voxel; the guard is there so that validation never sees the slice
next to a training slice. SLAB_MM = 4 holds two candidate slices (CANDIDATE_STRIDE 2): a
validation patch is then at least 6 mm from every training patch (slices 4k, 4k+2 held out,
4k-4..4k+7 guard, nearest training slices 4k-6 and 4k+8). Narrower would leave neighbouring
slices 2 mm apart; wider is too coarse for the subcortical group, which spans only ~35 mm of z
(slices 62-96, 9 slabs): one slab is about a tenth of it, so it keeps training and validation
patches at the usual train.val_fraction of 0.1-0.2.

Classes are balanced by a per-class cap (TRAIN_PER_CLASS / TEST_PER_CLASS centres sampled
without replacement from a CANDIDATE_STRIDE grid, so no two centres coincide).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .base import ImageSet, TaskData
from .config import DataConfig
from .mri_volume import MriVolume, load_mri_volume, read_mri_volume  # noqa: F401 (re-export)
from .transforms import patches_to_images

GROUP_PREFIXES = {
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus"),
    "insula-limbic": ("Insula", "Cingulum_", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital_", "Fusiform"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus", "Paracentral_Lobule"),
    "subcortical": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "temporal": ("Heschl", "Temporal_"),
    "cerebellum": ("Cerebelum_", "Vermis_"),
}
GROUPS = list(GROUP_PREFIXES)

PATCH_MM = 32
TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 150
CANDIDATE_STRIDE = 2
# Voxel columns on the midline plane and 1 mm either side belong to no patch.
MIDLINE_GAP = 3
# Axial slices (1 mm each) per spatial group: the unit a validation split holds out.
SLAB_MM = 4


def aal_group(region: str) -> int:
    """Index into GROUPS of an AAL region name such as 'Temporal_Pole_Sup_L'."""
    matches = [i for i, prefixes in enumerate(GROUP_PREFIXES.values()) if region.startswith(prefixes)]
    if len(matches) != 1:
        raise UserError(f"AAL region '{region}' has no lobar group; is aal.nii.txt the AAL atlas?")
    return matches[0]


def group_volume(volume: MriVolume) -> np.ndarray:
    """Per voxel: lobar group + 1, or 0 outside the AAL regions."""
    lookup = np.zeros(max(volume.names) + 1, dtype=np.int8)
    for label, region in volume.names.items():
        lookup[label] = aal_group(region) + 1
    return lookup[volume.labels]


def midline_index(volume: MriVolume) -> int:
    """The voxel column (first axis) at x = 0 mm."""
    return int(round(np.linalg.solve(volume.affine, [0.0, 0.0, 0.0, 1.0])[0]))


def footprint_start(centres: np.ndarray, patch_mm: int = PATCH_MM) -> np.ndarray:
    """First voxel (x, y) of each axial patch; the patch covers start .. start + patch_mm - 1."""
    return centres[:, :2] - patch_mm // 2


def slab_of(centres: np.ndarray) -> torch.Tensor:
    """The spatial group (axial slab, see the module docstring) of each patch centre."""
    return torch.from_numpy(centres[:, 2].astype(np.int64) // SLAB_MM)


def side_candidates(volume: MriVolume, groups: np.ndarray, patch_mm: int = PATCH_MM) -> dict[str, np.ndarray]:
    """Candidate patch centres (n x 3 voxel indices on the CANDIDATE_STRIDE grid, inside a
    labelled voxel of `groups`) whose whole footprint lies on one side: "train" = the left
    hemisphere, "test" = the right, MIDLINE_GAP voxel columns apart."""
    candidates = np.argwhere(groups[::CANDIDATE_STRIDE, ::CANDIDATE_STRIDE, ::CANDIDATE_STRIDE] > 0)
    candidates *= CANDIDATE_STRIDE
    first_x = footprint_start(candidates, patch_mm)[:, 0]
    last_x = first_x + patch_mm - 1
    mid, half_gap = midline_index(volume), MIDLINE_GAP // 2
    return {"train": candidates[last_x < mid - half_gap],  # left hemisphere: x < 0 mm in RAS
            "test": candidates[first_x > mid + half_gap]}


def plan_centres(volume: MriVolume, seed: int, patch_mm: int = PATCH_MM,
                 per_class: dict[str, int] | None = None, groups: np.ndarray | None = None,
                 names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Patch centres (n x 3 voxel indices) per split, class-balanced and hemisphere-disjoint.

    groups: per voxel class + 1 (0 = none), default the lobar groups; names: its classes."""
    per_class = per_class or {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    if groups is None:
        groups, names = group_volume(volume), GROUPS
    pools = side_candidates(volume, groups, patch_mm)
    centres = {}
    for split, purpose in (("train", 11), ("test", 12)):
        rng = np.random.default_rng([seed, purpose])
        pool = pools[split]
        pool_groups = groups[tuple(pool.T)]
        chosen = []
        for group in range(1, len(names) + 1):
            members = pool[pool_groups == group]
            if len(members) == 0:
                raise UserError(
                    f"no {split} patch centres for group {names[group - 1]}; is this the AAL atlas?"
                )
            take = min(per_class[split], len(members))
            chosen.append(members[np.sort(rng.choice(len(members), take, replace=False))])
        centres[split] = np.concatenate(chosen)
    return centres


def extract_patches(t1: np.ndarray, centres: np.ndarray, patch_mm: int, mirror: bool) -> np.ndarray:
    """Axial patches, N x patch_mm x patch_mm, anterior up; mirror flips left-right."""
    padded = np.pad(t1, ((patch_mm, patch_mm), (patch_mm, patch_mm), (0, 0)))  # zero = air
    start = footprint_start(centres, patch_mm) + patch_mm
    steps = np.arange(patch_mm)
    xs = (start[:, 0, None] + steps)[:, None, :]  # columns
    ys = (start[:, 1, None] + steps[::-1])[:, :, None]  # rows, anterior (high y) first
    patches = padded[xs, ys, centres[:, 2, None, None]]
    return patches[:, :, ::-1] if mirror else patches


def patch_sets(volume: MriVolume, centres: dict[str, np.ndarray], groups: np.ndarray, patch_mm: int,
               image_size: int) -> dict[str, ImageSet]:
    """The train and test ImageSets of planned centres: label = groups at the centre - 1; the
    test patches mirrored; the training patches carry their axial slab (spatial_group)."""
    sets = {}
    for split in ("train", "test"):
        patches = extract_patches(volume.t1, centres[split], patch_mm, mirror=split == "test")
        images = patches_to_images(patches, image_size)
        labels = torch.from_numpy(groups[tuple(centres[split].T)].astype(np.int64) - 1)
        slabs = slab_of(centres[split]) if split == "train" else None  # only training is split again
        sets[split] = ImageSet(images, labels, spatial_group=slabs)
    return sets


def build_mri_task(volume: MriVolume, seed: int, image_size: int | None,
                   patch_mm: int = PATCH_MM) -> tuple[TaskData, dict[str, np.ndarray]]:
    """The patch task plus the centres behind it (for checks such as spatial disjointness).

    image_size None keeps the patches at patch_mm px (1 px per mm).
    """
    image_size = image_size or patch_mm
    centres = plan_centres(volume, seed, patch_mm)
    sets = patch_sets(volume, centres, group_volume(volume), patch_mm, image_size)
    task = TaskData(
        name="mri",
        train=sets["train"],
        test=sets["test"],
        class_names=list(GROUPS),
        provenance={
            "source": ", ".join(volume.sources),
            "split_rule": (
                "train = left-hemisphere patches, test = right-hemisphere patches (mirrored); "
                f"footprints never cross the midline, {MIDLINE_GAP} voxel columns apart: "
                "zero shared voxels"
            ),
            "patch": f"axial {patch_mm} x {patch_mm} mm of the Colin27 T1, resized to {image_size}",
            "label": "AAL lobar group of the centre voxel",
            "spatial_group": f"axial slab of {SLAB_MM} slices ({SLAB_MM} mm): slice // {SLAB_MM}",
            "groups": {name: list(prefixes) for name, prefixes in GROUP_PREFIXES.items()},
            "intensity": volume.intensity,
        },
    )
    return task, centres


def load_mri(cfg: DataConfig) -> TaskData:
    volume = read_mri_volume(cfg.path, cfg.intensity)
    task, _ = build_mri_task(volume, cfg.seed, cfg.image_size)
    return task
