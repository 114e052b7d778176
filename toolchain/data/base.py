"""In-memory labelled image sets shared by every loader, recipe and exporter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Images as float32 N x C x H x W in [0, 1], labels as int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class TaskData:
    """A classification task: train and test splits plus what the model needs to know."""

    name: str
    train: ImageSet
    test: ImageSet
    # Name of each label. A loader may leave it empty: validate.py then names the classes
    # class_<label> (load_task always returns it filled, one name per model output).
    class_names: list[str]
    # Free-form provenance (source files, split rule) recorded in the run report.
    provenance: dict = field(default_factory=dict)
    # Training images whose labels were withheld (train_fraction < 1): N x C x H x W, or None.
    unlabelled: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]
