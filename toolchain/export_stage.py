"""The pipeline's export step: split the images the exporter needs, run it, shape the report.

Shared by `medkd-build` (after training) and `medkd-export` (a finished run, re-exported
for another target or precision without retraining).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from medkd.export.evaluate import accuracy
from medkd.export.exporter import Deployable, ExportData
from medkd.export.formats import suggest
from medkd.export.plan import ExportPlan, plan_export
from medkd.export.run_export import export_deployables
from medkd.recipes import UNLABELLED

from .data.base import ImageSet, TaskData
from .data.segmentation import SegmentationTask
from .errors import ConfigError
from .seg_metrics import pooled_dice


def training_pool(task: TaskData) -> ImageSet:
    """Every training image; the withheld-label ones serve calibration, which needs no labels."""
    if task.unlabelled is None:
        return task.train
    withheld = torch.full((len(task.unlabelled),), UNLABELLED, dtype=task.train.labels.dtype)
    task_ids = None  # multi-task data: the withheld images keep their task ids
    if task.train.task_ids is not None:
        task_ids = torch.cat([task.train.task_ids, task.unlabelled_task_ids])
    return ImageSet(torch.cat([task.train.images, task.unlabelled]), torch.cat([task.train.labels, withheld]),
                    task_ids)


def make_plan(cfg: DictConfig, task: TaskData) -> ExportPlan:
    """Validate every export option against the target and the data, before anything runs."""
    check_export_task(cfg, task)
    pool = training_pool(task)
    labelled = int((pool.labels != UNLABELLED).sum())
    return plan_export(OmegaConf.to_container(cfg.target), OmegaConf.to_container(cfg.export), labelled, len(pool),
                       (task.in_chans, task.image_size, task.image_size))


def export_data(task: TaskData, plan: ExportPlan, seed: int, held_out: ImageSet | None = None) -> ExportData:
    """Validation images (labelled) and calibration images (any), disjoint, from the training side.

    With `held_out` (the images train.val_fraction kept out of training), parity and the int8
    guard are checked on those: images the student never fitted, so the guard sees what int8
    costs on unseen images. Otherwise they are training images the student has fitted.
    """
    train = training_pool(task)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    if held_out is not None and len(held_out):
        calibration = order[: plan.calibration_images]
        checked = held_out.subset(torch.arange(min(len(held_out), plan.validation_images)))
    else:
        labelled = order[train.labels[order] != UNLABELLED]
        validation = labelled[: plan.validation_images]
        rest = order[~torch.isin(order, validation)]
        calibration = rest[: plan.calibration_images]
        checked = train.subset(validation)
    return ExportData(
        calibration=train.images[calibration].numpy(),
        validation_images=checked.images.numpy(),
        validation_labels=checked.labels.numpy(),
        test_images=task.test.images.numpy(),
        test_labels=task.test.labels.numpy(),
        metric=accuracy,
        metric_name="accuracy",
        class_names=list(task.class_names),
        preprocessing=model_io(task, f"N x {task.num_classes} class logits"),
    )


def model_io(task: TaskData | SegmentationTask, output: str) -> dict:
    """What the deployed model takes and gives, for the bundle and firmware manifests."""
    return {"layout": "NCHW", "dtype": "float32", "value_range": [0.0, 1.0], "channels": task.in_chans,
            "image_size": task.image_size, "output": output,
            "source": task.provenance.get("source") if isinstance(task.provenance, dict) else None}


def make_segmentation_plan(cfg: DictConfig, task: SegmentationTask) -> ExportPlan:
    """make_plan for a segmentation task: the labelled slices serve validation, every training
    image (labelled or not) may calibrate."""
    if cfg.export.task != "all":
        raise ConfigError(f"export.task={cfg.export.task} needs multi-task data (data=multitask); leave it at all")
    unlabelled = 0 if task.unlabelled is None else len(task.unlabelled)
    export = OmegaConf.to_container(cfg.export)
    # A segmentation set is a few dozen slices: int8 calibrates on what is left after validation
    # (at most half of the labelled slices) when export.calibration.images asks for more.
    validation = min(export["validation_images"], len(task.train) // 2)
    available = max(1, len(task.train) + unlabelled - validation)
    calibration = export["calibration"]["images"]
    if isinstance(calibration, int) and not isinstance(calibration, bool):
        export["calibration"]["images"] = min(calibration, available)
    return plan_export(OmegaConf.to_container(cfg.target), export, len(task.train), len(task.train) + unlabelled,
                       (task.in_chans, task.image_size, task.image_size))


def segmentation_export_data(task: SegmentationTask, plan: ExportPlan, seed: int) -> ExportData:
    """Validation: labelled training slices and their masks (parity as pixel agreement, the
    int8 guard on pooled Dice); calibration: the other training images, disjoint from them."""
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))
    validation = order[: plan.validation_images]
    pool = task.train.images[order[plan.validation_images:]]
    if task.unlabelled is not None:
        pool = torch.cat([pool, task.unlabelled])
    return ExportData(
        calibration=pool[: plan.calibration_images].numpy(),
        validation_images=task.train.images[validation].numpy(),
        validation_labels=task.train.masks[validation].numpy(),
        test_images=task.test.images.numpy(),
        test_labels=task.test.masks.numpy(),
        metric=pooled_dice,
        metric_name="dice",
        class_names=list(task.class_names),
        preprocessing=model_io(task, f"N x {task.num_classes} x {task.image_size} x {task.image_size} class logits"),
    )


def check_export_task(cfg: DictConfig, task: TaskData) -> None:
    """`export.task` names a task of a multi-task data set, or is `all`."""
    choice = cfg.export.task
    if choice == "all":
        return
    names = [t.name for t in task.tasks] if task.tasks else []
    if not names:
        raise ConfigError(f"export.task={choice} needs multi-task data (data=multitask); leave it at all")
    if choice not in names:
        raise ConfigError(f"unknown export.task '{choice}'{suggest(str(choice), names)}; "
                          f"choose all or one of: {', '.join(names)}")


def selected_modules(cfg: DictConfig, modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The task switch: every deployable, or the one `export.task` names."""
    return modules if cfg.export.task == "all" else {cfg.export.task: modules[cfg.export.task]}


def run_export(cfg: DictConfig, run_dir: Path, task: TaskData | SegmentationTask, modules: dict[str, torch.nn.Module],
               plan: ExportPlan, log, progress, held_out: ImageSet | None = None) -> dict:
    segmentation = isinstance(task, SegmentationTask)
    data = segmentation_export_data(task, plan, cfg.seed) if segmentation else export_data(task, plan, cfg.seed,
                                                                                            held_out)
    where = "held out of training" if held_out is not None and len(held_out) else "training images the student fitted"
    log(f"export for {cfg.target.name}: precision {plan.requested_precision}, formats {', '.join(plan.formats)}; "
        f"{len(data.validation_labels)} validation images ({where}) / {len(data.calibration)} calibration images")
    per_task = not segmentation and bool(task.tasks) and set(modules) <= {t.name for t in task.tasks}
    # A per-task model is checked, calibrated and tested on its own task's images only.
    deployables = [Deployable(name, module.eval(),
                              export_data(task.task_view(name), plan, cfg.seed) if per_task else None)
                   for name, module in selected_modules(cfg, modules).items()]
    section = export_deployables(run_dir, OmegaConf.to_container(cfg.target), OmegaConf.to_container(cfg.export),
                                 plan, deployables, data, log=log, progress=progress)
    section["metric"] = data.metric_name  # the task metric of test_metric and the int8 guard
    section["opset"] = cfg.export.opset
    section["profile_batch"] = cfg.target.batch.opt
    return section


def deployed_summary(section: dict) -> str:
    """One line per deployable: which file is deployed and its test metric."""
    parts = []
    for name, model in section["models"].items():
        metric = model["test_metric"].get(model["deployed_precision"])
        parts.append(f"deployed {name}: {model['deployed_file']} ({model['deployed_precision']}, test {metric:.4f})")
    return "; ".join(parts)
