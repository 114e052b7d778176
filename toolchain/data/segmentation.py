"""Segmentation data: images with a class id per pixel (data=mri-seg, seg-folder, seg-npz).

A segmentation loader returns a SegmentationTask at the images' own size, with masks already
checked against the images (check_masks). `finish_segmentation_task` then applies what every
segmentation data set shares, in the same order as load_task does for classification: the
max_train / max_test caps, the label budget (data.train_fraction), the resize to image_size,
and the provenance (class pixel shares, which slices keep labels).

The label budget and the caps keep slices EVENLY SPACED along the slicing axis (`position`,
the slice index, where the data set has one; else the loader's order, which for files named
by slice number is the same): a budget is then a deterministic function of the fraction,
identical for every recipe and seed, and spans the anatomy rather than a random clump. The
withheld-label slices become the unlabelled transfer set (data.unlabelled_transfer).

Class 0 is the background in every data set. Masks are resized nearest-neighbour (a class id
has no in-between values); images bilinear, as classification images are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import TaskShape
from .config import native_image_size
from .transforms import resize_images


@dataclass
class MaskSet:
    """Images float32 N x C x H x W in [0, 1]; masks int64 N x H x W of class ids; position
    int64 N (the slice index along the slicing axis) or None (no known position)."""

    images: torch.Tensor
    masks: torch.Tensor
    position: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        n, _, h, w = self.images.shape
        if self.masks.shape != (n, h, w) or self.masks.dtype != torch.int64:
            raise ValueError(f"masks must be int64 of shape ({n}, {h}, {w}), got "
                             f"{self.masks.dtype} {tuple(self.masks.shape)}")
        if self.position is not None and (self.position.shape != (n,) or self.position.dtype != torch.int64):
            raise ValueError(f"position must be int64 of shape ({n},), got "
                             f"{self.position.dtype} {tuple(self.position.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    # What the shared training loop (train.fit) batches: masks are a segmentation set's labels,
    # and a segmentation set is one task.
    @property
    def labels(self) -> torch.Tensor:
        return self.masks

    @property
    def task_ids(self) -> None:
        return None

    def subset(self, index: torch.Tensor) -> "MaskSet":
        return MaskSet(self.images[index], self.masks[index],
                       None if self.position is None else self.position[index])


@dataclass
class SegmentationTask(TaskShape):
    """A segmentation task: train and test splits, class names (class 0 = background)."""

    name: str
    train: MaskSet
    test: MaskSet
    class_names: list[str]
    provenance: dict = field(default_factory=dict)
    # Training images whose masks were withheld by the label budget: N x C x H x W, or None.
    unlabelled: torch.Tensor | None = None


def check_masks(images_shape: tuple[int, ...], masks: np.ndarray, num_classes: int | None, where: str) -> None:
    """A one-line UserError unless `masks` (N x H x W integers) fit images of `images_shape`
    (N x H x W [x C]) and hold only class ids 0..num_classes-1 (None: any non-negative id)."""
    if masks.ndim != 3:
        raise UserError(f"{where}: masks have shape {masks.shape}; expected N x H x W class ids")
    if masks.shape != tuple(images_shape[:3]):
        raise UserError(f"{where}: masks are {masks.shape} but images are {tuple(images_shape[:3])} "
                        "(N x H x W); every image needs a mask of its own size")
    if masks.dtype.kind not in "iu":
        raise UserError(f"{where}: masks must hold integer class ids, got {masks.dtype}")
    if masks.size and masks.min() < 0:
        raise UserError(f"{where}: masks hold class id {masks.min()}; ids start at 0 (background)")
    if num_classes is not None and masks.size and masks.max() >= num_classes:
        raise UserError(f"{where}: masks hold class id {masks.max()} but the class list has {num_classes} "
                        f"classes (0..{num_classes - 1}); add the class name or fix the masks")


def default_class_names(max_id: int) -> list[str]:
    """background, class_1 .. class_<max_id>, for data sets that name no classes."""
    return ["background"] + [f"class_{i}" for i in range(1, max_id + 1)]


def evenly_spaced(count: int, keep: int) -> np.ndarray:
    """`keep` indices into range(count), evenly spaced and including both ends when keep > 1."""
    keep = max(1, min(keep, count))
    if keep == 1:
        return np.array([count // 2])
    return np.unique(np.round(np.linspace(0, count - 1, keep)).astype(np.int64))


def spaced_subset(images: MaskSet, keep: int) -> np.ndarray:
    """Indices of `keep` slices of `images`, evenly spaced by position (else by order), sorted."""
    order = np.arange(len(images)) if images.position is None else np.argsort(images.position.numpy(), kind="stable")
    return np.sort(order[evenly_spaced(len(images), keep)])


def budget_size(count: int, fraction: float) -> int:
    """How many of `count` training slices keep their masks under data.train_fraction."""
    return max(1, int(round(fraction * count)))


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of int64 N x H x W masks to N x size x size."""
    if masks.shape[-2:] == (size, size):
        return masks
    resized = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")
    return resized[:, 0].round().to(torch.int64)


def resize_mask_set(images: MaskSet, size: int) -> MaskSet:
    return replace(images, images=resize_images(images.images, size), masks=resize_masks(images.masks, size))


def pixel_shares(images: MaskSet, num_classes: int) -> list[float]:
    """The fraction of pixels of each class over the whole split (class 0 = background)."""
    counts = torch.bincount(images.masks.reshape(-1), minlength=num_classes).double()
    return [round(float(c), 6) for c in counts / counts.sum().clamp_min(1)]


def finish_segmentation_task(task: SegmentationTask, config) -> SegmentationTask:
    """Caps, label budget, resize and provenance (module docstring); `config` is a DataConfig."""
    train, test = task.train, task.test
    if config.max_train is not None:
        train = train.subset(torch.from_numpy(spaced_subset(train, config.max_train)))
    if config.max_test is not None:
        test = test.subset(torch.from_numpy(spaced_subset(test, config.max_test)))
    size = config.image_size or square_size(train)
    unlabelled = None
    labelled_positions = None
    if config.train_fraction < 1.0:
        keep = spaced_subset(train, budget_size(len(train), config.train_fraction))
        if config.unlabelled_transfer:
            withheld = np.setdiff1d(np.arange(len(train)), keep)
            unlabelled = resize_images(train.images[torch.from_numpy(withheld)], size) if len(withheld) else None
        train = train.subset(torch.from_numpy(keep))
        if train.position is not None:
            labelled_positions = train.position.tolist()
    native = train.images.shape[-1]
    train, test = resize_mask_set(train, size), resize_mask_set(test, size)
    provenance = {
        **task.provenance,
        "seed": config.seed,
        "image_size": size,
        "max_train": config.max_train,
        "max_test": config.max_test,
        "train_fraction": config.train_fraction,
        "labelled_train_slices": len(train),
        "labelled_slice_positions": labelled_positions,
        "unlabelled_train": 0 if unlabelled is None else len(unlabelled),
        "train_pixel_share": pixel_shares(train, task.num_classes),
        "test_pixel_share": pixel_shares(test, task.num_classes),
    }
    if task.provenance.get("pixel_spacing_mm"):  # mm per pixel at the loader's size -> at `size`
        provenance["pixel_spacing_mm"] = task.provenance["pixel_spacing_mm"] * native / size
    return SegmentationTask(task.name, train, test, list(task.class_names), provenance, unlabelled)


def square_size(images: MaskSet) -> int:
    """The images' own size, which image_size null keeps; they must be square."""
    height, width = images.images.shape[-2:]
    return native_image_size(height, width, f"the {len(images)} training images")
