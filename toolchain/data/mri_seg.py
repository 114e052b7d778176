"""data=mri-seg: sagittal slices of the Colin27 T1, each pixel labelled with its AAL lobar group.

Real data from Debian `mricron-data` (mri_volume.py), the volume and grouping of the patch
classification task (mri.py): classes are background (0: white matter, CSF, skull, air; the
AAL labels only grey matter) and the 7 lobar groups of mri.GROUPS, in that order (1..7).

Split rule (spatially disjoint, no shared voxel): training slices come from the left
hemisphere, test slices from the right, MIDLINE_GAP voxel columns apart. Why sagittal
slices rather than axial half-slices: a sagittal slice lies wholly in one hemisphere, so the
split needs no cropping at the midline, and the slice is a full, square-able view of the
hemisphere's anatomy (an axial half-slice is 89 x 217 mm, more than half of a square image
would be padding). Mirroring the right hemisphere to the left is then the choice of slice
(x -> -x): a slice shows the same side of the brain in either split, with the same
orientation. Every lobar group appears on both sides; the subcortical group only in the
medial slices (within ~35 mm of the midline).

`position` of a slice = its distance from the midline in mm, in both splits: the label budget
and the caps keep slices evenly spaced in it (segmentation.py), and a validation split holds
out slabs of it. Slices with fewer than MIN_LABELLED_PIXELS labelled voxels (the outermost
ones graze the cortex) are left out.

Geometry: a square in-plane field of view of FOV_MM x FOV_MM mm (1 px per mm, y x z) centred on
the AAL-labelled brain, padded with air where it leaves the volume, rows superior first and
columns posterior to anterior; data.image_size (default 128 in mri-seg.yaml) resizes it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .config import DataConfig
from .mri import GROUPS, MIDLINE_GAP, group_volume, midline_index
from .mri_volume import MriVolume, read_mri_volume
from .segmentation import MaskSet, SegmentationTask

# Side of the square field of view: the labelled brain's largest in-plane extent (180 mm,
# anterior-posterior) plus a 2 mm margin each side.
FOV_MM = 184
MIN_LABELLED_PIXELS = 200
CLASS_NAMES = ["background", *GROUPS]


def slice_columns(groups: np.ndarray, mid: int) -> dict[str, np.ndarray]:
    """The sagittal slice indices (first axis) of each split, ordered from the midline outwards."""
    half_gap = MIDLINE_GAP // 2
    labelled = (groups > 0).sum(axis=(1, 2)) >= MIN_LABELLED_PIXELS
    columns = np.arange(groups.shape[0])
    left = columns[labelled & (columns < mid - half_gap)][::-1]  # x < 0 mm in RAS
    right = columns[labelled & (columns > mid + half_gap)]
    return {"train": left, "test": right}


def field_of_view(groups: np.ndarray, fov: int = FOV_MM) -> tuple[int, int]:
    """(first y, first z) of the square in-plane window centred on the labelled brain."""
    _, ys, zs = np.nonzero(groups)
    return (int(round((ys.min() + ys.max() + 1 - fov) / 2)), int(round((zs.min() + zs.max() + 1 - fov) / 2)))


def sagittal_window(volume: np.ndarray, columns: np.ndarray, start: tuple[int, int], fov: int) -> np.ndarray:
    """N x fov x fov windows of `volume` at sagittal `columns`: rows superior first, columns
    posterior to anterior; zero (air, background) outside the volume."""
    y0, z0 = start
    pad = fov  # wide enough for any window that overlaps the volume
    padded = np.pad(volume[columns], ((0, 0), (pad, pad), (pad, pad)))
    window = padded[:, y0 + pad: y0 + pad + fov, z0 + pad: z0 + pad + fov]  # N x y x z
    return np.ascontiguousarray(window.transpose(0, 2, 1)[:, ::-1])  # N x z (superior first) x y


def build_mri_seg_task(volume: MriVolume, fov: int = FOV_MM) -> SegmentationTask:
    groups = group_volume(volume)
    mid = midline_index(volume)
    columns = slice_columns(groups, mid)
    start = field_of_view(groups, fov)
    sets = {}
    for split, cols in columns.items():
        if len(cols) == 0:
            raise UserError(f"no {split} slices with {MIN_LABELLED_PIXELS}+ AAL voxels; is this the AAL atlas?")
        images = torch.from_numpy(sagittal_window(volume.t1, cols, start, fov))[:, None]
        masks = torch.from_numpy(sagittal_window(groups, cols, start, fov).astype(np.int64))
        sets[split] = MaskSet(images.float(), masks, torch.from_numpy(np.abs(cols - mid).astype(np.int64)))
    return SegmentationTask(
        name="mri-seg",
        train=sets["train"],
        test=sets["test"],
        class_names=list(CLASS_NAMES),
        provenance={
            "source": ", ".join(volume.sources),
            "split_rule": (
                "train = sagittal slices of the left hemisphere, test = of the right (x -> -x); "
                f"{MIDLINE_GAP} voxel columns at the midline belong to neither: zero shared voxels"
            ),
            "slice": f"sagittal, {fov} x {fov} mm field of view around the labelled brain (1 px per mm)",
            "slices": {split: len(cols) for split, cols in columns.items()},
            "position": "distance of the slice from the midline, mm",
            "pixel_spacing_mm": 1.0,  # at the field of view's own size; rescaled with the images
            "label": "AAL lobar group per voxel; 0 = background (not an AAL grey-matter region)",
            "intensity": volume.intensity,
        },
    )


def load_mri_seg(cfg: DataConfig) -> SegmentationTask:
    return build_mri_seg_task(read_mri_volume(cfg.path, cfg.intensity))
