"""data=seg-npz: a MedMNIST-style `.npz` with masks instead of labels.

Arrays: train_images, train_masks, test_images, test_masks; images N x H x W (gray) or
N x H x W x 3, masks N x H x W integer class ids (0 = background). Optional `class_names`
(string array, class 0 first), else background, class_1, ... up to the largest id. Pixel
types as in npz.py: uint8 / 255, anything else by data.intensity. Slices keep the file's
order, which the label budget spaces evenly (segmentation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .config import DataConfig, required_path
from .intensity import IntensityRule, scale_to_unit
from .npz import check_images, file_class_names, read_npz_arrays
from .segmentation import MaskSet, SegmentationTask, check_masks, default_class_names
from .transforms import to_nchw_float

REQUIRED_KEYS = ("train_images", "train_masks", "test_images", "test_masks")


def load_seg_npz(cfg: DataConfig) -> SegmentationTask:
    path = required_path(cfg, "an .npz with train_images, train_masks, test_images, test_masks")
    arrays, names = read_npz_arrays(path, REQUIRED_KEYS, "segmentation", "seg-npz")
    images = {split: check_images(arrays[f"{split}_images"], f"{split}_images", path) for split in ("train", "test")}
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise UserError(f"{path}: train images are {images['train'].shape[1:]} but test images are "
                        f"{images['test'].shape[1:]}; both splits need one size and channel count")
    for split in ("train", "test"):
        check_masks(images[split].shape, arrays[f"{split}_masks"], None, f"{path} {split}_masks")
    max_id = max(int(arrays[f"{split}_masks"].max()) for split in ("train", "test"))
    class_names = file_class_names(names, max_id, path) if names is not None else default_class_names(max_id)
    for split in ("train", "test"):  # with named classes, ids must name one of them
        check_masks(images[split].shape, arrays[f"{split}_masks"], len(class_names), f"{path} {split}_masks")

    if images["train"].dtype == np.uint8:
        intensity = "uint8 / 255"
    else:
        rule = cfg.intensity or IntensityRule("range")
        low, high = rule.bounds([images["train"]])
        images = {split: scale_to_unit(array, low, high) for split, array in images.items()}
        intensity = rule.describe(low, high)
    sets = {split: MaskSet(to_nchw_float(images[split]), torch.from_numpy(arrays[f"{split}_masks"].astype(np.int64)))
            for split in ("train", "test")}
    return SegmentationTask(
        name="seg-npz",
        train=sets["train"],
        test=sets["test"],
        class_names=class_names,
        provenance={"source": str(path.resolve()), "split_rule": "the file's own train/test arrays",
                    "intensity": intensity},
    )
