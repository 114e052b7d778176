"""The Colin27 T1 MRI and its AAL atlas, from the Debian package `mricron-data`.

Files (default directory /usr/share/mricron/templates):
    ch2.nii.gz    Colin27 single-subject T1, MNI space, 1 mm, 181 x 217 x 181, uint8
    aal.nii.gz    AAL atlas: 116 region labels (0 = not an AAL region) on the same grid
    aal.nii.txt   one line per region: "<label> <name> <AAL code>", e.g. "1 Precentral_L 2001"

Both volumes are brought to RAS orientation (first axis runs patient left -> right) and
must share one grid with 1 mm voxels. Used by the patch task (mri.py) and meant for the
segmentation work, hence `load_mri_volume`.

Intensity: data.intensity (range | window:LEVEL,WIDTH, intensity.py) applies to the whole
volume, through the same function as every other loader. Its default (null) is a window
taken from the volume itself: the 0.5th..99.5th percentile of the head (non-zero voxels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .intensity import IntensityRule, scale_to_unit

DEFAULT_DIR = Path("/usr/share/mricron/templates")
T1_FILE, ATLAS_FILE, NAMES_FILE = "ch2.nii.gz", "aal.nii.gz", "aal.nii.txt"
# Robust range: the 0.5th..99.5th percentile of the head (non-zero voxels) maps to 0..1,
# so a few bright vessels or fat voxels do not squash the grey/white contrast.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


@dataclass
class MriVolume:
    t1: np.ndarray  # float32, X x Y x Z, intensity-normalised to [0, 1]
    labels: np.ndarray  # int32, same shape, AAL label per voxel (0 = none)
    names: dict[int, str]  # AAL label -> region name, e.g. 1 -> "Precentral_L"
    affine: np.ndarray  # 4 x 4 voxel -> MNI mm (RAS)
    sources: list[str]
    intensity: dict  # the rule and the bounds that mapped the T1 to [0, 1]


def load_mri_volume(
    path: str | Path | None = None, intensity: IntensityRule | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(normalised T1 float32, AAL labels int32, {label: region name}) on one RAS 1 mm grid."""
    volume = read_mri_volume(path, intensity)
    return volume.t1, volume.labels, volume.names


def read_mri_volume(path: str | Path | None = None, intensity: IntensityRule | None = None) -> MriVolume:
    import nibabel as nib

    directory = Path(path) if path is not None else DEFAULT_DIR
    files = [directory / name for name in (T1_FILE, ATLAS_FILE, NAMES_FILE)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"MRI file(s) {', '.join(missing)} not found in {directory}; run "
            "`apt-get install mricron-data` or set data.path to a directory holding them"
        )
    t1_path, atlas_path, names_path = files
    try:
        t1_img = nib.as_closest_canonical(nib.load(t1_path))
        atlas_img = nib.as_closest_canonical(nib.load(atlas_path))
        t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
        labels = np.asarray(atlas_img.dataobj).astype(np.int32)
    except Exception as exc:  # nibabel raises many types for a corrupt file
        raise UserError(f"cannot read NIfTI in {directory}: {str(exc).splitlines()[0]}") from None

    if t1.shape != labels.shape or not np.allclose(t1_img.affine, atlas_img.affine, atol=1e-3):
        raise UserError(
            f"{t1_path.name} {t1.shape} and {atlas_path.name} {labels.shape} are not on the same "
            "voxel grid; both must be in the same MNI space"
        )
    if not np.allclose(t1_img.header.get_zooms()[:3], 1.0, atol=1e-3):
        raise UserError(f"{t1_path} has voxel size {t1_img.header.get_zooms()[:3]}; expected 1 mm")

    names = _read_region_names(names_path)
    unnamed = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
    if unnamed:
        raise UserError(f"{atlas_path} uses label(s) {unnamed[:5]} that {names_path.name} does not name")
    normalised, bounds = normalise_intensity(t1, intensity)
    return MriVolume(
        t1=normalised,
        labels=labels,
        names=names,
        affine=t1_img.affine,
        sources=[str(f) for f in files],
        intensity=bounds,
    )


def normalise_intensity(volume: np.ndarray, rule: IntensityRule | None = None) -> tuple[np.ndarray, dict]:
    """The volume mapped to [0, 1] by `rule` (None: the robust head window) and what was used."""
    head = volume[volume > 0]
    if head.size == 0:
        raise UserError("the T1 volume is all zeros; check the MRI file")
    if rule is None:
        low, high = (float(v) for v in np.percentile(head, [LOW_PERCENTILE, HIGH_PERCENTILE]))
        used = {"rule": f"head percentiles {LOW_PERCENTILE}..{HIGH_PERCENTILE}", "low": low, "high": high}
    else:
        low, high = rule.bounds([volume])  # range: min..max of the volume, both splits' source
        used = rule.describe(low, high)
    return scale_to_unit(volume, low, high), used


def _read_region_names(path: Path) -> dict[int, str]:
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise UserError(f"{path} line {number} is not '<label> <name> [code]': {line!r}")
        names[int(fields[0])] = fields[1]
    if not names:
        raise UserError(f"{path} names no regions")
    return names
