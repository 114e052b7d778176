"""Dataset name -> loader, and `load_task`, the one entry point the pipeline calls.

A loader turns a validated DataConfig into a full TaskData (images may still be at their
native size). `load_task` then applies what every dataset shares, in this order: the
checks of validate.py (labels, classes, NaN/Inf), max_train / max_test caps, train_fraction,
resize to image_size (null: the data set's own size), and records the one-feature intensity
baseline of the final splits (baseline.py). See config.py for the keys.

`multitask` (multitask.py) has keys of its own: it loads each of its tasks through load_task
and merges them.

Segmentation data sets (image + mask per pixel, segmentation.py) have a table of their own,
SEGMENTATION_LOADERS, and an entry point of their own, `load_segmentation_task`: the two kinds
of task feed different models and metrics, so each entry point refuses the other kind's names
with a one-line error instead of returning a type its caller cannot use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..errors import ConfigError
from .base import ImageSet, TaskData
from .baseline import intensity_baseline
from .config import DataConfig, config_mapping, native_image_size, parse_data_config
from .ct import load_ct
from .fashion_mnist import load_fashion_mnist
from .folder import load_folder
from .mri import load_mri
from .mri_regions import load_mri_regions
from .mri_seg import load_mri_seg
from .multitask import NAME as MULTITASK
from .multitask import load_multitask
from .npz import load_npz
from .sampling import stratified_cap, stratified_fraction
from .seg_folder import load_seg_folder
from .seg_npz import load_seg_npz
from .segmentation import SegmentationTask, finish_segmentation_task
from .transforms import resize_images
from .validate import check_finite, validate_task

LOADERS: dict[str, Callable[[DataConfig], TaskData]] = {
    "mri": load_mri,
    "mri-regions": load_mri_regions,
    "ct": load_ct,
    "fashion-mnist": load_fashion_mnist,
    "npz": load_npz,
    "folder": load_folder,
}


SEGMENTATION_LOADERS: dict[str, Callable[[DataConfig], SegmentationTask]] = {
    "mri-seg": load_mri_seg,
    "seg-folder": load_seg_folder,
    "seg-npz": load_seg_npz,
}


def available_datasets() -> list[str]:
    return sorted([*LOADERS, MULTITASK, *SEGMENTATION_LOADERS])


def load_task(cfg) -> TaskData:
    """Validate the `data` config, load and check the dataset, then cap, subsample and resize it."""
    raw = config_mapping(cfg)
    if raw.get("name") == MULTITASK:
        return load_multitask(raw, load_task)
    config = parse_data_config(raw, available_datasets())
    if config.name in SEGMENTATION_LOADERS:
        raise ConfigError(f"data={config.name} is a segmentation data set (a mask per image); this recipe "
                          f"classifies images: use a classification data set ({', '.join(sorted(LOADERS))})")
    task = validate_task(LOADERS[config.name](config), config.allow_unseen_test_classes)
    size = config.image_size or native_image_size(*task.train.images.shape[-2:], f"the {task.name} images")
    train, test, seed = task.train, task.test, config.seed
    if config.max_train is not None:
        train = _subset(train, stratified_cap(train.labels.numpy(), config.max_train, seed, "max_train"))
    if config.max_test is not None:
        test = _subset(test, stratified_cap(test.labels.numpy(), config.max_test, seed, "max_test"))
    unlabelled = unlabelled_groups = None
    if config.train_fraction < 1.0:
        keep = stratified_fraction(train.labels.numpy(), config.train_fraction, seed)
        if config.unlabelled_transfer:
            withheld = _subset(train, np.setdiff1d(np.arange(len(train)), keep))
            unlabelled, unlabelled_groups = resize_images(withheld.images, size), withheld.spatial_group
        train = _subset(train, keep)
    train = replace(train, images=resize_images(train.images, size))  # keeps the spatial groups
    test = replace(test, images=resize_images(test.images, size))
    provenance = {
        **task.provenance,
        "seed": config.seed,
        "image_size": size,
        "max_train": config.max_train,
        "max_test": config.max_test,
        "train_fraction": config.train_fraction,
        "unlabelled_train": 0 if unlabelled is None else len(unlabelled),
        "train_per_class": _counts(train, task.num_classes),
        "test_per_class": _counts(test, task.num_classes),
        "intensity_baseline": intensity_baseline(train.images, train.labels, test.images, test.labels),
    }
    return TaskData(task.name, train, test, list(task.class_names), provenance, unlabelled,
                    unlabelled_spatial_group=unlabelled_groups)


def _subset(images: ImageSet, index: np.ndarray) -> ImageSet:
    # Index tensors copy, so the full-size source tensors are freed with the loader's task.
    return images.subset(torch.from_numpy(index))


def _counts(images: ImageSet, num_classes: int) -> list[int]:
    return torch.bincount(images.labels, minlength=num_classes).tolist()


def load_segmentation_task(cfg) -> SegmentationTask:
    """The segmentation counterpart of load_task: validate the config, load the image/mask
    pairs (the loader checks masks against images), then cap, budget and resize them."""
    config = parse_data_config(config_mapping(cfg), available_datasets())
    if config.name not in SEGMENTATION_LOADERS:
        raise ConfigError(f"data={config.name} is not a segmentation data set; choose one of: "
                          f"{', '.join(sorted(SEGMENTATION_LOADERS))}")
    task = SEGMENTATION_LOADERS[config.name](config)
    for split in ("train", "test"):
        check_finite(task.name, split, getattr(task, split).images)
    return finish_segmentation_task(task, config)
