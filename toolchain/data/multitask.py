"""`data=multitask`: several classification tasks in one data set, for multi-task recipes (LoRKD).

Keys (conf/data/multitask.yaml; a missing key takes its default):

    tasks        [mri, ct, fashion-mnist]  built-in tasks, by data set name: any of
                                           BUILTIN_TASKS (the ones that need no data.path)
    npz_paths    []      MedMNIST-format .npz files (npz.py), one more task each, named after
                         the file (pathmnist_64.npz -> task "pathmnist_64")
    image_size   32      every task's images are resized to image_size x image_size;
                         null = the largest size among the tasks
    max_train    800     cap on EACH task's training split (stratified by class)
    max_test     200     cap on EACH task's test split
    train_fraction, unlabelled_transfer, seed, allow_unseen_test_classes
                         as for every data set (config.py), applied to each task on its own
    intensity    null    null = each task's own default rule (mri: head window, ct:
                         window:40,400, npz: range); or a mapping task -> rule, e.g.
                         {ct: 'window:40,80'} (intensity.py)
    augment      per task  training-time augmentation (augment.py): null (off), one spec for
                         every task, or a mapping task -> spec, where `npz` is the spec of every
                         npz task not named; a task the mapping leaves out is not augmented,
                         and entries for built-in tasks not in data.tasks are ignored
    augment_views 2      fixed views per training image when augmenting (augment.py)

Each task is loaded exactly as `data=<task>` would load it (registry.load_task): its own
classes, its own train/test split (the MRI and CT tasks: spatially disjoint halves of their
volume; Fashion-MNIST and npz files: their official splits), its own checks (validate.py),
caps and intensity baseline. The tasks are then laid end to end (base.py: task_ids, TaskInfo,
global labels with per-task offsets; spatial groups stay task-local, -1 for a task without).

One input shape, by this rule:
  - size: resized (bilinear, antialiased) to image_size: resizing keeps each task's whole field
    of view, where cropping would cut anatomy and padding would leave a border that gives
    the task away;
  - channels: the largest channel count among the tasks; a gray task next to an RGB one is
    replicated to 3 identical channels, which is exactly that gray image in RGB (turning the
    RGB tasks gray instead would throw away their colour, e.g. a pathology stain).

Clashes are one-line errors: a task named twice (two files with one name, or a file named
like a built-in task in the list), or an npz file with the same classes (its own
class_names) or the same training images as another task: the same data set twice.

Default size: 3 tasks x (800 train + 200 test) = 2400 train / 600 test images at 1 x 32 x 32,
the size of the default single-task MRI build.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from .augment import DEFAULT_VIEWS, AugmentSettings, augment_settings
from .base import NO_SPATIAL_GROUP, TASK_CLASS_SEPARATOR, ImageSet, TaskData, TaskInfo
from .config import with_defaults
from .transforms import resize_images

NAME = "multitask"
BUILTIN_TASKS = ("mri", "ct", "fashion-mnist")
DEFAULTS = {
    "name": NAME,
    "tasks": list(BUILTIN_TASKS),
    "npz_paths": [],
    "image_size": 32,
    "max_train": 800,
    "max_test": 200,
    "train_fraction": 1.0,
    "unlabelled_transfer": True,
    "seed": 0,
    "intensity": None,
    "allow_unseen_test_classes": False,
    "augment": None,
    "augment_views": DEFAULT_VIEWS,
}
# Passed to every task's own loader unchanged (checked there).
SHARED_KEYS = ("max_train", "max_test", "train_fraction", "unlabelled_transfer", "seed",
               "allow_unseen_test_classes")
_DEFAULT_NAME = re.compile(r"class_\d+")


def task_specs(cfg) -> tuple[list[dict], int | None]:
    """Each task's own `data` config, in task order, and the common image size (None: largest)."""
    values = with_defaults(cfg, DEFAULTS, f" for data.name={NAME}")
    tasks, paths = _string_list(values["tasks"], "tasks"), _string_list(values["npz_paths"], "npz_paths")
    bad = [t for t in tasks if t not in BUILTIN_TASKS]
    if bad:
        raise ConfigError(
            f"data.tasks: unknown task(s) {', '.join(bad)}; built-in tasks: {', '.join(BUILTIN_TASKS)} "
            "(MedMNIST files go in data.npz_paths)"
        )
    names = tasks + [Path(p).stem for p in paths]
    for i, name in enumerate(names):
        if name in names[:i]:
            what = f"file {paths[i - len(tasks)]}" if i >= len(tasks) else "data.tasks"
            raise UserError(
                f"data.multitask: task name '{name}' is used twice ({what}); each task needs its "
                "own name (rename the .npz file)"
            )
    if len(names) < 2:
        raise ConfigError(
            f"data.name={NAME} needs at least two tasks (data.tasks + data.npz_paths), got "
            f"{names or 'none'}; for one task use data={names[0] if names else 'mri'}"
        )
    intensity = values["intensity"] or {}
    if not isinstance(intensity, dict):
        raise ConfigError(
            f"data.intensity for {NAME} is null (each task's default) or a mapping task -> rule, "
            f"e.g. {{ct: 'window:40,80'}}; got '{intensity}'"
        )
    stray = sorted(set(intensity) - set(names))
    if stray:
        raise ConfigError(f"data.intensity names unknown task(s) {', '.join(stray)}; tasks: {', '.join(names)}")
    augment_settings(values, names, names[len(tasks):])  # checked before any task loads; used by training
    size = values["image_size"]
    shared = {key: values[key] for key in SHARED_KEYS}
    specs = []
    for i, name in enumerate(names):
        spec = {"name": name, **shared, "image_size": size, "intensity": intensity.get(name)}
        if i >= len(tasks):
            spec.update(name="npz", path=paths[i - len(tasks)])
        specs.append(spec)
    return specs, size


def multitask_augmentation(cfg) -> AugmentSettings:
    """Each task's training-time augmentation (augment.py), by task name."""
    specs, _ = task_specs(cfg)
    names = [_task_name(spec) for spec in specs]
    npz_tasks = [name for name, spec in zip(names, specs) if spec["name"] == "npz"]
    return augment_settings(with_defaults(cfg, DEFAULTS), names, npz_tasks)


def _task_name(spec: dict) -> str:
    return spec["name"] if spec["name"] != "npz" else Path(spec["path"]).stem


def load_multitask(cfg, load_task: Callable[[dict], TaskData]) -> TaskData:
    """The tasks of `cfg`, each loaded by `load_task` (registry.py), merged into one TaskData."""
    specs, size = task_specs(cfg)
    names = [_task_name(spec) for spec in specs]
    loaded: list[TaskData] = []
    for name, spec in zip(names, specs):
        task = _load_one(name, spec, load_task)
        _check_no_clash(task, spec, names[: len(loaded)], loaded)
        loaded.append(task)
    size = size or max(task.image_size for task in loaded)
    chans = max(task.in_chans for task in loaded)
    for name, task in zip(names, loaded):
        if task.in_chans not in (1, chans):
            raise UserError(f"task {name} has {task.in_chans} channels; tasks can be mixed only with 1 or {chans}")

    infos, offset = [], 0
    for name, task in zip(names, loaded):
        infos.append(TaskInfo(name, tuple(task.class_names), offset))
        offset += task.num_classes

    def merged(split: str) -> ImageSet:
        parts = [getattr(task, split) for task in loaded]
        return ImageSet(
            torch.cat([_shape(part.images, size, chans) for part in parts]),
            torch.cat([_global(part.labels, info.offset) for part, info in zip(parts, infos)]),
            torch.cat([torch.full((len(part),), t, dtype=torch.int64) for t, part in enumerate(parts)]),
            _groups([(part.spatial_group, len(part)) for part in parts]),
        )

    withheld = [(t, task) for t, task in enumerate(loaded) if task.unlabelled is not None]
    unlabelled = unlabelled_ids = unlabelled_groups = None
    if withheld:
        unlabelled = torch.cat([_shape(task.unlabelled, size, chans) for _, task in withheld])
        unlabelled_ids = torch.cat([torch.full((len(task.unlabelled),), t, dtype=torch.int64) for t, task in withheld])
        unlabelled_groups = _groups([(task.unlabelled_spatial_group, len(task.unlabelled)) for _, task in withheld])
    train, test = merged("train"), merged("test")
    class_names = [f"{info.name}{TASK_CLASS_SEPARATOR}{c}" for info in infos for c in info.class_names]
    provenance = {
        "source": "; ".join(f"{n}: {t.provenance.get('source')}" for n, t in zip(names, loaded)),
        "split_rule": "each task keeps its own split: " + "; ".join(
            f"{n}: {t.provenance.get('split_rule')}" for n, t in zip(names, loaded)),
        "input_rule": (
            f"every task resized (bilinear, antialiased) to {size} x {size}; "
            + (f"gray tasks replicated to {chans} channels" if chans > 1 else "all gray, 1 channel")
        ),
        "labels": "global: task offset + task-local class id (see task_offsets)",
        "task_offsets": {info.name: info.offset for info in infos},
        "image_size": size,
        "in_chans": chans,
        "train_per_task": {n: len(t.train) for n, t in zip(names, loaded)},
        "test_per_task": {n: len(t.test) for n, t in zip(names, loaded)},
        "intensity_baseline": {n: t.provenance.get("intensity_baseline") for n, t in zip(names, loaded)},
        "tasks": {n: t.provenance for n, t in zip(names, loaded)},
    }
    return TaskData(NAME, train, test, class_names, provenance, unlabelled, infos, unlabelled_ids, unlabelled_groups)


def _load_one(name: str, spec: dict, load_task: Callable[[dict], TaskData]) -> TaskData:
    """Task `name` as data=<its data set> loads it (checked by validate.py); errors name the task."""
    try:
        return load_task(spec)
    except UserError as exc:
        raise type(exc)(f"data.multitask task '{name}': {exc}") from None


def _check_no_clash(task: TaskData, spec: dict, earlier_names: list[str], earlier: list[TaskData]) -> None:
    """An npz task must not be a data set already in the list (same named classes or images)."""
    if spec["name"] != "npz":
        return
    named = not all(_DEFAULT_NAME.fullmatch(c) for c in task.class_names)
    for other_name, other in zip(earlier_names, earlier):
        if task.train.images.shape == other.train.images.shape and torch.equal(task.train.images, other.train.images):
            raise UserError(
                f"data.npz_paths: {spec['path']} has the same training images as task '{other_name}': "
                "the same data set twice? drop one"
            )
        if named and task.class_names == other.class_names:
            shown = ", ".join(task.class_names[:4]) + (", ..." if len(task.class_names) > 4 else "")
            raise UserError(
                f"data.npz_paths: {spec['path']} has the same classes as task '{other_name}' "
                f"({shown}): the same data set twice? drop one"
            )


def _shape(images: torch.Tensor, size: int, chans: int) -> torch.Tensor:
    images = resize_images(images, size)
    return images.expand(-1, chans, -1, -1).contiguous() if images.shape[1] != chans else images


def _groups(parts: list[tuple[torch.Tensor | None, int]]) -> torch.Tensor | None:
    """Each task's spatial groups laid end to end (task-local numbers: the task id tells the
    volume); NO_SPATIAL_GROUP for a task without them, None if no task has them."""
    if all(groups is None for groups, _ in parts):
        return None
    return torch.cat([torch.full((n,), NO_SPATIAL_GROUP, dtype=torch.int64) if groups is None else groups
                      for groups, n in parts])


def _global(labels: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.where(labels >= 0, labels + offset, labels)  # UNLABELLED stays


def _string_list(value, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"data.{key} must be a list of names/paths, e.g. data.{key}=[a,b], got '{value}'")
    return list(value)
