"""MedMNIST-format `.npz` files (e.g. pathmnist.npz).

Expected arrays: train_images, train_labels, test_images, test_labels; images
N x H x W (gray) or N x H x W x 3 (RGB), labels N or N x 1 integers. uint8 images are
divided by 255; any other integer or float type (uint16, int16 Hounsfield units, float) maps
to [0, 1] by data.intensity (intensity.py), with `range` taken from train_images. Images keep
their size (a MedMNIST+ pathmnist_64.npz stays 64 px) unless data.image_size says otherwise.
An optional `class_names` string array names the classes, else "class_<label>".
`val_*` arrays are ignored: medkd trains on train and reports on test, the same protocol
as the MedMNIST benchmarks, and has no model-selection step that would use a val split.
"""

from __future__ import annotations

import zipfile

import numpy as np
import torch

from ..errors import UserError
from .base import ImageSet, TaskData
from .config import DataConfig, required_path
from .intensity import IntensityRule, scale_to_unit
from .transforms import to_nchw_float

REQUIRED_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def load_npz(cfg: DataConfig) -> TaskData:
    path = required_path(cfg, "a MedMNIST-format .npz file")
    arrays, names = read_npz_arrays(path, REQUIRED_KEYS, "MedMNIST", "npz")

    splits = {}
    for split in ("train", "test"):
        images = check_images(arrays[f"{split}_images"], f"{split}_images", path)
        labels = _check_labels(arrays[f"{split}_labels"], f"{split}_labels", path)
        if len(images) != len(labels):
            raise UserError(
                f"{path}: {split}_images has {len(images)} images but {split}_labels has "
                f"{len(labels)} labels; they must match"
            )
        splits[split] = (images, labels)
    (train_images, _), (test_images, _) = splits["train"], splits["test"]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(
            f"{path}: train images are {train_images.shape[1:]} but test images are "
            f"{test_images.shape[1:]}; both splits need the same image size and channels"
        )
    if train_images.dtype != test_images.dtype:
        raise UserError(
            f"{path}: train_images are {train_images.dtype} but test_images are "
            f"{test_images.dtype}; both splits need one pixel type"
        )

    max_label = max(int(labels.max()) for _, labels in splits.values())
    class_names = file_class_names(names, max_label, path)
    if train_images.dtype == np.uint8:
        intensity = "uint8 / 255"
    else:
        rule = cfg.intensity or IntensityRule("range")
        low, high = rule.bounds([train_images])
        splits = {split: (scale_to_unit(images, low, high), labels)
                  for split, (images, labels) in splits.items()}
        intensity = rule.describe(low, high)
    sets = {
        split: ImageSet(
            to_nchw_float(images),  # load_task resizes after capping: less work
            torch.from_numpy(labels.astype(np.int64)),
        )
        for split, (images, labels) in splits.items()
    }
    return TaskData(
        name="npz",
        train=sets["train"],
        test=sets["test"],
        class_names=class_names,
        provenance={
            "source": str(path.resolve()),
            "split_rule": "the file's own train/test arrays; val_* arrays ignored",
            "intensity": intensity,
        },
    )


def read_npz_arrays(path, required: tuple[str, ...], kind: str, name: str) -> tuple[dict, np.ndarray | None]:
    """The `required` arrays of the .npz at `path` and its class_names (None if absent);
    one-line UserErrors for a missing file, a folder, a non-zip, missing keys or pickled data.
    kind names the format in messages ("MedMNIST"), name the data set (data=NAME)."""
    if not path.exists():
        raise UserError(f"npz file not found: {path} (check data.path)")
    if path.is_dir():
        raise UserError(f"data.path {path} is a directory; name={name} needs a .npz file")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz (zip) archive; give a {kind}-format .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in required if key not in archive.files]
            if missing:
                raise UserError(f"{path} lacks key(s) {', '.join(missing)}; a {kind} .npz needs {', '.join(required)}")
            arrays = {key: archive[key] for key in required}
            names = archive["class_names"] if "class_names" in archive.files else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # ValueError: an object array, which would need pickle (unsafe, never loaded).
        raise UserError(f"cannot read {path} as .npz: {str(exc).splitlines()[0]}") from None
    return arrays, names


def check_images(images: np.ndarray, key: str, path) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        hint = " (3D MedMNIST volumes are not supported)" if images.ndim == 4 else ""
        raise UserError(
            f"{path}: {key} has shape {images.shape}; expected N x H x W (gray) or "
            f"N x H x W x 3 (RGB){hint}"
        )
    if len(images) == 0:
        raise UserError(f"{path}: {key} is empty; each split needs at least one image")
    if images.dtype.kind not in "uif":
        raise UserError(f"{path}: {key} must hold integer or float pixels, got {images.dtype}")
    return images


def _check_labels(labels: np.ndarray, key: str, path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise UserError(
            f"{path}: {key} has shape {labels.shape}: multi-label data (e.g. ChestMNIST) is "
            "unsupported; give one class index per image"
        )
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(f"{path}: {key} has shape {labels.shape}; expected N or N x 1 class indices")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{path}: {key} must hold integer class indices, got dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{path}: {key} has negative class index {labels.min()}; indices start at 0")
    return labels


def file_class_names(names, max_label: int, path) -> list[str]:
    """The file's names; [] (validate.py names them class_<label>) when it has none."""
    if names is None:
        return []  # not 1 + max_label names: a sparse label such as 10**12 would build them all
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise UserError(f"{path}: class_names must be a 1-D string array, got {names.dtype} {names.shape}")
    if len(names) <= max_label:
        raise UserError(
            f"{path}: class_names has {len(names)} names but labels go up to {max_label}; "
            "give one name per class"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
