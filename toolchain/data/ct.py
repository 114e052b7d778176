"""The CT task (`data=ct`): anatomical level of 2D patches from a real head CT.

Source: Debian `invesalius-examples`, /usr/share/doc/invesalius-examples/examples/Cranium.inv3
(read by inv3.py): "ProMED CT 0051", a head CT of 108 axial slices of 256 x 256 voxels,
0.957 x 0.957 mm in plane, 1.5 mm apart, int16 Hounsfield units. Slice 0 is the most
inferior (mandible), slice 107 the vertex; rows run posterior -> anterior.

Label: the anatomical level of the patch's slice, in four slabs drawn by looking at this scan
(the head is tilted, so each slab is named by what dominates it):

    skull-base   slices  0-20  (0-30 mm):      mandible, teeth, maxilla, skull base
    orbits       slices 21-41  (31.5-61.5 mm): orbits, nasal cavity, sinuses, petrous bone
    ventricles   slices 42-68  (63-102 mm):    frontal sinus, lateral ventricles, basal ganglia
    vertex       slices 69-107 (103.5-160.5):  above the ventricles up to the vertex

Level is a question of shape (which bones, which cavities), not brightness: every level has
bone, soft tissue and air, so mean intensity hardly tells them apart. load_task measures that
(provenance["intensity_baseline"], baseline.py): on the default 2400 / 600 patches at 32 px
the best one-feature classifier scores 0.34 (nearest class mean 0.29) against a chance of 0.25,
while a small CNN reaches about 0.75.

Examples: axial patches of PATCH_PX x PATCH_PX voxels (46 mm) at one slice, resized to
data.image_size (null: 48 px), with at least HEAD_FRACTION of their voxels inside the head
(so no level is recognisable by how much air a patch shows). The head is the voxels above
-500 HU after a 5 x 5 opening (which removes the thin head holder) with its holes filled.

Split (spatially disjoint): train patches come from the image-left half of the head, test
patches from the image-right half, mirrored left-right so they look like train patches. Every
footprint lies wholly on its side of the midline column (the mean column of the head voxels)
with MIDLINE_GAP columns between the sides, so no test patch shares a voxel with a train
patch. Halves rather than separate z-ranges because the label IS the z-range: slabs split by z
would leave each class in one split only. (The file stores no patient orientation, so
"left" means image columns below the midline.)

Validation slabs: each training patch carries spatial_group = its slice // SLAB_SLICES
(base.py), so a validation split (train.val_split, sampling.py spatial_holdout) can hold out
whole axial slabs with a guard slab either side that trains nothing. Patches are 2D axial, so
patches on different slices share no voxel; the guard keeps the slice next to a validation
slice out of training. SLAB_SLICES = 2 (3 mm): a validation patch is at least 3 slices
(4.5 mm) from every training patch. Here the classes ARE z-ranges, so slabs cannot mix
levels freely: every level spans at least 21 slices (10 slabs; vertex patches end near slice
98, where the head gets too small), so one slab is about a tenth of a level and each level
gives whole slabs of its own to validation and keeps most of its slices for training (the
two slabs that straddle a level boundary, slices 20-21 and 68-69, hold two levels). Held-out
slabs lie inside the level's range, so validation asks for a level at slices training never
saw, between or beside training slices of the same level: a harder test than neighbours of
training patches, still easier than the other half of the head (the test split).

Balance: TRAIN_PER_CLASS / TEST_PER_CLASS patch positions per level, sampled without
replacement from a CANDIDATE_STRIDE grid (no two patches coincide; they overlap, as in any
patch set from one volume).

Intensity: data.intensity (intensity.py) maps Hounsfield units to [0, 1]; null = DEFAULT_WINDOW,
the soft-tissue window 40,400 (-160..240 HU): air black, fat dark, brain mid grey, bone white,
so both the bone shapes and the ventricles stay visible. `range` takes min..max of the
training half of the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import ImageSet, TaskData
from .config import DataConfig
from .intensity import IntensityRule, scale_to_unit
from .inv3 import read_inv3
from .transforms import patches_to_images

DEFAULT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
# The levels below were drawn on this volume; another scan needs its own.
EXPECTED_SHAPE = (108, 256, 256)
# name: (first slice, last slice + 1)
LEVELS = {
    "skull-base": (0, 21),
    "orbits": (21, 42),
    "ventricles": (42, 69),
    "vertex": (69, 108),
}
PATCH_PX = 48
HEAD_FRACTION = 0.75
HEAD_HU = -500.0
OPENING_PX = 5
TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 150
CANDIDATE_STRIDE = 2
# Voxel columns on the midline and 1 either side belong to no patch.
MIDLINE_GAP = 3
# Axial slices (1.5 mm each) per spatial group: the unit a validation split holds out.
SLAB_SLICES = 2
DEFAULT_WINDOW = IntensityRule("window", 40.0, 400.0)


@dataclass
class CtVolume:
    hu: np.ndarray  # float32 Z x Y x X, Hounsfield units
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    source: str
    name: str


def read_ct_volume(path: Path | None = None) -> CtVolume:
    path = path or DEFAULT_PATH
    if not path.is_file():
        raise UserError(
            f"CT file {path} not found; run `apt-get install invesalius-examples` (and check that "
            "dpkg does not exclude /usr/share/doc) or set data.path to Cranium.inv3"
        )
    volume = read_inv3(path)
    if volume.modality != "CT":
        raise UserError(f"{path} holds modality '{volume.modality}', not CT")
    if volume.hu.shape != EXPECTED_SHAPE:
        raise UserError(
            f"{path} is {volume.hu.shape} voxels; the CT levels were drawn on Cranium.inv3 "
            f"{EXPECTED_SHAPE} (invesalius-examples) and do not fit another scan"
        )
    return CtVolume(volume.hu.astype(np.float32), volume.spacing_mm, volume.source, volume.name)


def head_mask(hu: np.ndarray) -> np.ndarray:
    """Per voxel: inside the head (see the module docstring)."""
    body = hu > HEAD_HU
    return _fill(~_erode(~_erode(body)))  # opening: erosion, then dilation (= erosion of the rest)


def _erode(mask: np.ndarray) -> np.ndarray:
    """In-plane binary erosion by an OPENING_PX square (voxels outside the slice do not count)."""
    k, pad = OPENING_PX, OPENING_PX // 2
    padded = np.pad(mask, ((0, 0), (pad, pad), (pad, pad)), constant_values=True)
    _, rows, cols = mask.shape
    across = np.logical_and.reduce([padded[:, :, d : d + cols] for d in range(k)])  # separable
    return np.logical_and.reduce([across[:, d : d + rows] for d in range(k)])


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled: a voxel between the first and last head voxel of both its row and column."""
    def between(axis: int) -> np.ndarray:
        n = mask.shape[axis]
        steps = np.arange(n).reshape([-1 if d == axis else 1 for d in range(3)])
        first = np.argmax(mask, axis=axis, keepdims=True)
        last = n - 1 - np.argmax(np.flip(mask, axis), axis=axis, keepdims=True)
        return (steps >= first) & (steps <= last) & mask.any(axis=axis, keepdims=True)

    return between(2) & between(1)


def midline_column(head: np.ndarray) -> int:
    """The voxel column (x) nearest the mean column of the head voxels."""
    return int(round(float(np.nonzero(head)[2].mean())))


def plan_patches(head: np.ndarray, seed: int, per_class: dict[str, int] | None = None,
                 patch_px: int = PATCH_PX) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Patch starts (n x 3: slice, first row, first column) and level ids per split, and the midline."""
    per_class = per_class or {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    mid, half_gap = midline_column(head), MIDLINE_GAP // 2
    fraction = window_fraction(head, patch_px)
    first_x = np.arange(fraction.shape[2])
    on_grid = (np.arange(fraction.shape[1]) % CANDIDATE_STRIDE == 0)[:, None] & (
        first_x % CANDIDATE_STRIDE == 0)[None, :]
    on_side = {
        "train": first_x + patch_px - 1 < mid - half_gap,
        "test": first_x > mid + half_gap,
    }
    starts, levels = {}, {}
    for split, purpose in (("train", 21), ("test", 22)):
        rng = np.random.default_rng([seed, purpose])
        chosen, ids = [], []
        for level, (name, (first, stop)) in enumerate(LEVELS.items()):
            ok = (fraction[first:stop] >= HEAD_FRACTION) & on_grid[None] & on_side[split][None, None, :]
            candidates = np.argwhere(ok) + np.array([first, 0, 0])
            if len(candidates) == 0:
                raise UserError(f"no {split} patches for CT level {name}; is this Cranium.inv3?")
            take = min(per_class[split], len(candidates))
            chosen.append(candidates[np.sort(rng.choice(len(candidates), take, replace=False))])
            ids.append(np.full(take, level, dtype=np.int64))
        starts[split], levels[split] = np.concatenate(chosen), np.concatenate(ids)
    return starts, levels, mid


def slab_of(starts: np.ndarray) -> torch.Tensor:
    """The spatial group (axial slab, see the module docstring) of each patch start."""
    return torch.from_numpy(starts[:, 0].astype(np.int64) // SLAB_SLICES)


def window_fraction(mask: np.ndarray, size: int) -> np.ndarray:
    """Per slice and patch start (row, column): the share of the size x size window inside `mask`.

    A summed-area table: four lookups per window instead of size^2 additions.
    """
    table = np.zeros((mask.shape[0], mask.shape[1] + 1, mask.shape[2] + 1), dtype=np.int32)
    table[:, 1:, 1:] = mask.astype(np.int32).cumsum(1).cumsum(2)
    inside = (table[:, size:, size:] - table[:, :-size, size:]
              - table[:, size:, :-size] + table[:, :-size, :-size])
    return inside / float(size * size)


def extract_patches(volume: np.ndarray, starts: np.ndarray, patch_px: int, mirror: bool) -> np.ndarray:
    """N x patch_px x patch_px axial patches; mirror flips left-right."""
    steps = np.arange(patch_px)
    rows = (starts[:, 1, None] + steps)[:, :, None]
    cols = (starts[:, 2, None] + steps)[:, None, :]
    patches = volume[starts[:, 0, None, None], rows, cols]
    return patches[:, :, ::-1] if mirror else patches


def build_ct_task(volume: CtVolume, seed: int, image_size: int | None,
                  intensity: IntensityRule | None = None) -> tuple[TaskData, dict]:
    """The level task plus its plan: starts and levels per split, midline, head mask."""
    image_size = image_size or PATCH_PX
    head = head_mask(volume.hu)
    starts, levels, mid = plan_patches(head, seed)
    rule = intensity or DEFAULT_WINDOW
    train_side = volume.hu[:, :, : mid - MIDLINE_GAP // 2]  # `range` sees no test voxel
    low, high = rule.bounds([train_side])
    scaled = scale_to_unit(volume.hu, low, high)
    sets = {}
    for split in ("train", "test"):
        patches = extract_patches(scaled, starts[split], PATCH_PX, mirror=split == "test")
        images = patches_to_images(patches, image_size)
        slabs = slab_of(starts[split]) if split == "train" else None  # only training is split again
        sets[split] = ImageSet(images, torch.from_numpy(levels[split]), spatial_group=slabs)
    dz = volume.spacing_mm[2]
    task = TaskData(
        name="ct",
        train=sets["train"],
        test=sets["test"],
        class_names=list(LEVELS),
        provenance={
            "source": f"{volume.source} ({volume.name})",
            "split_rule": (
                f"train = image-left half of the head (columns < {mid - MIDLINE_GAP // 2}), test = "
                f"image-right half (columns > {mid + MIDLINE_GAP // 2}), mirrored; footprints never "
                f"cross the midline column {mid}: zero shared voxels"
            ),
            "patch": (
                f"axial {PATCH_PX} x {PATCH_PX} voxels ({PATCH_PX * volume.spacing_mm[0]:.0f} mm), "
                f">= {HEAD_FRACTION:.0%} inside the head, resized to {image_size}"
            ),
            "label": "anatomical level of the patch's slice",
            "spatial_group": (f"axial slab of {SLAB_SLICES} slices ({SLAB_SLICES * dz:g} mm): "
                              f"slice // {SLAB_SLICES}"),
            "levels": {name: {"slices": [first, stop - 1],
                              "mm": [round(first * dz, 1), round((stop - 1) * dz, 1)]}
                       for name, (first, stop) in LEVELS.items()},
            "intensity": rule.describe(low, high),
        },
    )
    return task, {"starts": starts, "levels": levels, "midline": mid, "head": head}


def load_ct(cfg: DataConfig) -> TaskData:
    task, _ = build_ct_task(read_ct_volume(cfg.path), cfg.seed, cfg.image_size, cfg.intensity)
    return task
