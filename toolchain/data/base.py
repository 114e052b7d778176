"""In-memory labelled image sets shared by every loader, recipe and exporter.

Single-task data (every data set but `multitask`) is what it always was: `task_ids` and
`tasks` are None.

Multi-task data (`data=multitask`, multitask.py) keeps every task's images in one ImageSet so
the training loop can batch mixed-task samples:

- `ImageSet.task_ids` (int64, one per image) says which task each image belongs to: an index
  into `TaskData.tasks`.
- `TaskData.tasks` lists the tasks in that order, each a TaskInfo(name, class_names, offset).
- `labels` are GLOBAL class ids: task t's local class k is label `tasks[t].offset + k`, the
  tasks' classes laid end to end (offsets 0, K_0, K_0 + K_1, ...). `class_names` is that
  concatenation with task-qualified names ("ct:vertex"). Why global and not per-task local ids:
  every consumer written for one task (training loop, accuracy, report, exporter, the
  scratch/kd/rd recipes) then stays correct on multi-task data without knowing about tasks:
  it sees one classifier over the union of the classes, never class 0 of one task confused
  with class 0 of another. A multi-task recipe (per-task heads) takes the task-local ids,
  0..K_t - 1, from `TaskData.local_labels(images)`, and one task's own data set (local labels,
  its class names, its provenance: what a per-task export or a per-task baseline needs) from
  `TaskData.task_view(name)`.
- Withheld labels (train_fraction < 1) stay UNLABELLED (-100) in both forms, and the withheld
  images' task ids are `TaskData.unlabelled_task_ids`.

Where an image came from (`ImageSet.spatial_group`, optional): data sets cut from one volume
(mri, ct) number the axial slab each training patch lies in, so a validation split can hold
out whole slabs (toolchain/data/sampling.py spatial_holdout). The promise a data set makes:
  - images in different slabs share no voxel;
  - slabs g and g + 1 are neighbours in space, and one slab is a wide enough gap between
    validation and training images (the data set picks the slab width with that in mind);
  - NO_SPATIAL_GROUP (-1) marks an image with no known position (multi-task data: the tasks
    without coordinates, e.g. fashion-mnist); None = no image has one.
On multi-task data slab numbers are per task (each task its own volume): the slab of an image
is (task id, spatial_group). The withheld-label images' slabs are `TaskData.unlabelled_spatial_group`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Separates the task from the class in a multi-task data set's class names: "ct:vertex".
TASK_CLASS_SEPARATOR = ":"
# spatial_group of an image whose position is unknown (see the module docstring).
NO_SPATIAL_GROUP = -1


@dataclass
class ImageSet:
    """Images as float32 N x C x H x W in [0, 1], labels as int64 N; task_ids and
    spatial_group int64 N or None."""

    images: torch.Tensor
    labels: torch.Tensor
    # Multi-task data only: the task of each image (index into TaskData.tasks).
    task_ids: torch.Tensor | None = None
    # The slab of its source volume each image lies in (module docstring); None = unknown.
    spatial_group: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        for name in ("task_ids", "spatial_group"):
            values = getattr(self, name)
            if values is not None and (values.shape != self.labels.shape or values.dtype != torch.int64):
                raise ValueError(
                    f"{name} must be int64 of shape ({self.images.shape[0]},), got "
                    f"{values.dtype} {tuple(values.shape)}"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images at `index`, with their labels, task ids and spatial groups."""
        def pick(values):
            return None if values is None else values[index]

        return ImageSet(self.images[index], self.labels[index], pick(self.task_ids), pick(self.spatial_group))


@dataclass(frozen=True)
class TaskInfo:
    """One task of a multi-task data set: its name, its classes, where its labels start."""

    name: str
    class_names: tuple[str, ...]
    # Global label of this task's class 0; its classes are offset .. offset + num_classes - 1.
    offset: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TaskShape:
    """What a model built for a task needs of it: classes, channels, image side. Shared by
    classification (TaskData) and segmentation (segmentation.SegmentationTask) tasks."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


@dataclass
class TaskData(TaskShape):
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
    # Multi-task data only (see the module docstring): the tasks, in task-id order.
    tasks: list[TaskInfo] | None = None
    # Multi-task data only: the task of each withheld-label image.
    unlabelled_task_ids: torch.Tensor | None = None
    # The spatial group of each withheld-label image, where the training images have them.
    unlabelled_spatial_group: torch.Tensor | None = None

    @property
    def is_multitask(self) -> bool:
        return self.tasks is not None

    def task_index(self, name: str) -> int:
        """The task id of task `name`; a KeyError naming the tasks if there is none."""
        names = [t.name for t in self.tasks or []]
        if name not in names:
            raise KeyError(f"no task '{name}' in {self.name}; tasks: {', '.join(names) or 'none'}")
        return names.index(name)

    def local_labels(self, images: ImageSet) -> torch.Tensor:
        """Task-local class ids (0..K_t - 1) of `images`' global labels; UNLABELLED stays."""
        if images.task_ids is None or not self.tasks:
            return images.labels
        offsets = torch.tensor([t.offset for t in self.tasks], dtype=images.labels.dtype)
        labelled = images.labels >= 0
        return torch.where(labelled, images.labels - offsets[images.task_ids], images.labels)

    def task_view(self, name: str) -> "TaskData":
        """Task `name` alone as single-task data: its images, local labels, classes, provenance.

        Single-task data is its own one task (named self.name).
        """
        if not self.tasks:
            if name != self.name:
                raise KeyError(f"no task '{name}' in {self.name}; it is a single task")
            return self
        index = self.task_index(name)
        info = self.tasks[index]

        def only(images: ImageSet) -> ImageSet:
            mine = images.task_ids == index
            groups = images.spatial_group
            groups = None if groups is None or (groups[mine] == NO_SPATIAL_GROUP).all() else groups[mine]
            return ImageSet(images.images[mine], self.local_labels(images)[mine], None, groups)

        unlabelled = unlabelled_groups = None
        if self.unlabelled is not None:
            mine = self.unlabelled_task_ids == index
            unlabelled = self.unlabelled[mine] if mine.any() else None
            if unlabelled is not None and self.unlabelled_spatial_group is not None:
                groups = self.unlabelled_spatial_group[mine]
                unlabelled_groups = None if (groups == NO_SPATIAL_GROUP).all() else groups
        provenance = self.provenance.get("tasks", {}).get(name, {})
        return TaskData(name, only(self.train), only(self.test), list(info.class_names),
                        dict(provenance), unlabelled, unlabelled_spatial_group=unlabelled_groups)
