"""`medkd-build` end to end: data -> teacher features -> recipe training -> export -> report.

Everything the user can get wrong (data, model names, weights, export options, run
directory, resume checkpoint) is checked before the run directory is touched, so a bad
invocation leaves nothing behind. The run directory is locked for the whole build
(medkd.toolchain.rundir) and gets a manifest.sha256 when the build finishes.
"""

from __future__ import annotations

import platform
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from medkd.recipes import build_recipe

from .atomic import atomic_save, atomic_write_text
from .checkpoint import config_fingerprint
from .config import default_run_dir
from .data import load_task
from .data.augment import AugmentSettings, ViewTable, augmentation, training_views
from .data.base import ImageSet, TaskData
from .data.val_split import split_validation as validation_split
from .device import check_precision
from .distributed import DistContext, broadcast_object, compute_once, setup, teardown
from .errors import UserError
from .export_stage import deployed_summary, make_plan, run_export, training_pool
from .features import teacher_features, view_teacher_features
from .metrics_log import NullMetricsLogger, build_metrics_logger
from .models.students import build_student, count_parameters
from .models.teacher_runtime import runtime_extractor
from .models.teachers import build_teacher
from .progress import StageTimer, policy_from_config
from .provenance import data_digest, source_revision, teacher_weights, write_manifest
from .report import write_report
from .rundir import LOG_NAME, check_location, locked, prepare
from .targets import target_summary
from .train import TrainSettings, accuracy, fit, predict, teacher_branch_accuracy


class RunLog:
    """Prints a line and appends it to run_dir/log.txt once the run directory exists."""

    def __init__(self):
        self.path: Path | None = None
        self.pending: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path is None:
            self.pending.append(line)
            return
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def attach(self, path: Path) -> None:
        self.path = path
        with path.open("a") as handle:
            handle.writelines(line + "\n" for line in self.pending)
        self.pending.clear()


def resolve_run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)


def training_fingerprint(cfg: DictConfig) -> str:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    sections = {k: OmegaConf.to_container(cfg[k]) for k in ("recipe", "data", "teacher", "student", "train")}
    sections["seed"] = cfg.seed
    if not cfg.recipe.needs_teacher:
        sections.pop("teacher")
    return config_fingerprint(sections)


def training_set(task, recipe) -> ImageSet:
    """The labelled images, plus the withheld-label ones when the recipe can learn from them."""
    return training_pool(task) if recipe.uses_unlabelled else task.train


def split_validation(task: TaskData, fraction: float, seed: int, rule: str = "auto",
                     log=None) -> tuple[TaskData, ImageSet | None]:
    """Hold out about `fraction` of the labelled training images for per-epoch validation.

    Training then never sees them, and the test split is left for one evaluation at the end.
    `rule` is train.val_split: auto | spatial | random (data/val_split.py): whole axial slabs
    with a guard slab either side where the images have positions (mri, ct), else per class
    at random. The rule used goes to `log` and to task.provenance (the report).
    """
    split = validation_split(task, fraction, seed, rule)
    if log is not None and fraction > 0:
        log(split.describe())
    return split.task, split.val


@dataclass
class BuildInputs:
    """Everything a build needs, checked before the run directory is touched."""

    run_dir: Path
    task: TaskData  # its train split excludes `val`
    val: ImageSet | None
    train: ImageSet  # what the recipe trains on (with the transfer set where it uses one)
    teacher: object | None
    recipe: object
    plan: object
    fingerprint: str
    teacher_info: dict | None  # for the report, kept after the teacher itself is released
    augment: AugmentSettings | None = None  # data.augment / data.augment_views, for the report
    views: ViewTable | None = None  # the K views of every image of `train`; None = not augmented


def check_inputs(cfg: DictConfig, ctx: DistContext, log) -> BuildInputs:
    run_dir = resolve_run_dir(cfg)
    check_location(run_dir)
    check_precision(cfg.train.precision, ctx.device)
    if cfg.train.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the number of "
                        f"processes ({ctx.world_size})")
    augment = augmentation(cfg.data)  # a bad spec fails before the data loads
    full_task = load_task(cfg.data)
    task, val = split_validation(full_task, cfg.train.val_fraction, cfg.seed, cfg.train.val_split, log)
    log(
        f"data: {task.name}  {len(task.train)} train / {len(val) if val else 0} validation / "
        f"{len(task.test)} test  {task.num_classes} classes  {task.in_chans}x{task.image_size}x{task.image_size}"
    )
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    teacher = build_teacher(cfg.teacher) if cfg.recipe.needs_teacher else None
    recipe = build_recipe(cfg.recipe, student, teacher.feature_dim if teacher else None, tasks=task.tasks,
                          teacher=teacher)
    train = training_set(task, recipe)
    if len(train) > len(task.train):
        log(f"transfer set: + {len(train) - len(task.train)} training images with withheld labels")
    views = training_views(augment, train, task, cfg.data.seed)
    if views is not None:
        log(f"augment: {augment.describe()['spec']}, {views.views} views per training image "
            "(view 0 = the image; teacher features of every view)")
    plan = make_plan(cfg, full_task)
    teacher_info = None if teacher is None else {
        **OmegaConf.to_container(cfg.teacher), "feature_dim": teacher.feature_dim,
        "weights": cfg.teacher.checkpoint or f"shipped with the package ({teacher.fingerprint})"}
    return BuildInputs(run_dir, task, val, train, teacher, recipe, plan, training_fingerprint(cfg), teacher_info,
                       augment, views)


def shared_teacher_features(cfg: DictConfig, ctx: DistContext, inputs: BuildInputs, progress) -> dict:
    """Frozen-teacher features (cached across runs): rank 0 computes, every rank gets train/val;
    test features only on rank 0, which alone evaluates the test split."""
    if inputs.teacher is None:
        return {"train": None, "val": None, "test": None}
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    # The one place the extractor is chosen: what the recipe caches, run by teacher.backend.
    extractor = runtime_extractor(inputs.recipe.feature_extractor(inputs.teacher), cfg.teacher.backend,
                                  cfg.teacher.precision, cache_dir, calibration_images=inputs.train.images)

    def features(images, split):
        return teacher_features(extractor, images, cache_dir, cfg.train.teacher_batch_size,
                                desc=f"teacher features ({split})", progress=progress, device=ctx.device)

    def train_features():
        if inputs.views is None:
            return features(inputs.train.images, "train")
        return view_teacher_features(features, inputs.train.images, inputs.views, "train")

    return {
        "train": compute_once(ctx, train_features),
        "val": compute_once(ctx, lambda: features(inputs.val.images, "val")) if inputs.val else None,
        "test": features(inputs.task.test.images, "test") if ctx.is_main else None,
    }


@contextmanager
def main_rank_holds(ctx: DistContext, run_dir: Path, cfg: DictConfig, fingerprint: str) -> Iterator[None]:
    """Rank 0 locks and prepares the run directory for the whole block; the other ranks wait
    for it and share its verdict, so a refused build stops every process with the same error."""
    with ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                stack.enter_context(locked(run_dir))
                # The resume checkpoint is checked here, before teacher features or any file.
                prepare(run_dir, resume=cfg.resume, overwrite=cfg.overwrite, fingerprint=fingerprint)
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(ctx, error)
        if error:
            raise UserError(error)
        yield


def run(cfg: DictConfig) -> dict:
    """One build; under torchrun every rank calls this, rank 0 alone writes and returns the report."""
    from .seg_pipeline import SEGMENTATION_RECIPES, run_segmentation
    from .vlm_pipeline import VLM_RECIPES, run_vlm

    ctx = setup(cfg.device)
    try:
        if cfg.recipe.name in SEGMENTATION_RECIPES:  # image + mask data, its own stages
            return run_segmentation(cfg, ctx)
        if cfg.recipe.name in VLM_RECIPES:  # a vision-language teacher, prompt tuning, its own stages
            return run_vlm(cfg, ctx)
        return _run(cfg, ctx)
    finally:
        teardown(ctx)


@dataclass
class RunStart:
    """What every build kind (classification, segmentation, prompt tuning) sets up first."""

    started: float  # time.perf_counter() at the start
    started_at: str  # ISO 8601, UTC
    progress: object  # the progress policy
    source: dict  # the code as it was when the build started
    stages: StageTimer


def start_run(cfg: DictConfig, log) -> RunStart:
    """Threads and seed from the config, the clock, the progress policy and the source revision."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    return RunStart(started, started_at, policy_from_config(cfg), source_revision(), StageTimer(log))


def _run(cfg: DictConfig, ctx: DistContext) -> dict:
    log = RunLog() if ctx.is_main else (lambda line: None)
    begun = start_run(cfg, log)
    started, started_at, progress, source, stages = (begun.started, begun.started_at, begun.progress,
                                                     begun.source, begun.stages)

    # 1. Everything that can fail on user input, before any file is written.
    with stages("setup", quiet_start=True):
        inputs = check_inputs(cfg, ctx, log)
    run_dir, task, recipe = inputs.run_dir, inputs.task, inputs.recipe

    with main_rank_holds(ctx, run_dir, cfg, inputs.fingerprint):
        metrics = NullMetricsLogger()
        if ctx.is_main:
            log.attach(run_dir / LOG_NAME)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            log(f"run directory: {run_dir}" + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
            metrics = build_metrics_logger(cfg.logger, run_dir)

        # 2. Frozen-teacher features, once per image set (cached across runs).
        with stages("teacher_features"):
            features = shared_teacher_features(cfg, ctx, inputs, progress)
            inputs.teacher = None  # the frozen model is not needed past this point

        # 3. Train with per-epoch checkpoints; the test split is evaluated once, after.
        settings = TrainSettings(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay, seed=cfg.seed, progress=progress,
                                 precision=cfg.train.precision)
        try:
            with stages("training"):
                result = fit(recipe, inputs.train, inputs.val, settings, run_dir, inputs.fingerprint,
                             features["train"], features["val"], resume=cfg.resume, log=log,
                             device=ctx.device, dist=ctx, on_epoch_end=lambda r: metrics.log_epoch(r["epoch"], r),
                             augment=inputs.views)
        finally:
            metrics.close()
        if not ctx.is_main:
            return {}
        with stages("test_evaluation", quiet_start=True):
            # Multi-task recipes route each test image to its task's expert and head.
            test_task_ids = task.test.task_ids if recipe.needs_task_ids else None
            student_logits = predict(recipe.evaluation_model().eval(), task.test.images, task_ids=test_task_ids)
            student_accuracy = accuracy(student_logits, task.test.labels)
            teacher_accuracy = teacher_branch_accuracy(recipe, features["test"], task.test.labels,
                                                       task_ids=test_task_ids)
        # The whole student (with every task expert for multi-task recipes), not one task's fusion.
        weights = _contiguous(recipe.student.state_dict())
        atomic_save(run_dir / "student.safetensors", lambda tmp: save_file(weights, str(tmp)))

        # 4. Export for the target: fold, ONNX, fp16/int8 behind parity and the accuracy guard,
        #    TensorRT engine or on-device bundle, firmware container, latency, plots.
        with stages("export"):
            # Per-task models are checked on their own task's training-side images (task_view).
            held_out = inputs.val if not task.tasks else None
            export = run_export(cfg, run_dir, task, recipe.deployables(), inputs.plan, log, progress, held_out)

        timing = {"wall_time_s": round(time.perf_counter() - started, 1), "stage_seconds": dict(stages.seconds),
                  "started_at": started_at}
        report = build_report(cfg, inputs, result, export, timing, source,
                              student_accuracy, teacher_accuracy, student_parameters(recipe))
        md_path, _ = write_report(run_dir, report)
        log(f"test accuracy {student_accuracy:.4f} (PyTorch fp32); {deployed_summary(export)}; report: {md_path}")
        write_manifest(run_dir)  # last: every file of the run is in place
        return report


def student_parameters(recipe) -> dict | int:
    """The deployed student's parameter count; for a student with task experts, what is
    stored (shared weights + experts + heads) and what one fused task model holds."""
    counts = getattr(recipe.student, "parameter_counts", None)
    return counts() if counts else count_parameters(recipe.deployable())


def build_report(cfg, inputs: BuildInputs, result, export: dict, timing: dict, source: dict, student_accuracy: float, teacher_accuracy: float | None, parameters: int) -> dict:
    task, train = inputs.task, inputs.train
    return {
        "run": {
            "recipe": cfg.recipe.name,
            "run_dir": str(inputs.run_dir),
            "seed": cfg.seed,
            "resumed_from_epoch": result.resumed_from_epoch,
            **timing,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": ("medkd-build " + " ".join(sys.argv[1:])
                        if sys.argv and "medkd-build" in sys.argv[0] else None),
            "versions": _versions(),
        },
        "data": {"name": task.name, "train": len(task.train), "validation": len(inputs.val) if inputs.val else 0,
                 "test": len(task.test), "unlabelled_transfer_set": len(train) - len(task.train),
                 "num_classes": task.num_classes, "class_names": task.class_names,
                 "image_shape": [task.in_chans, task.image_size, task.image_size],
                 "augment": inputs.augment.describe() if inputs.augment else None,
                 "provenance": task.provenance},
        "teacher": inputs.teacher_info,
        "student": {"name": cfg.student.name, "parameters": parameters},
        "training": {"epochs": cfg.train.epochs, "history": result.history,
                     "test_accuracy": student_accuracy, "teacher_test_accuracy": teacher_accuracy,
                     "device": result.device, "precision": result.precision, "world_size": result.world_size,
                     "kernel_backends": result.kernel_backends},
        "export": export,
        "target": target_summary(cfg.target, export),
        "provenance": {
            "medkd_source": source,
            "data": data_digest(task),
            "teacher_weights": teacher_weights(cfg.teacher) if cfg.recipe.needs_teacher else None,
            "manifest": "manifest.sha256 (check with: medkd-verify RUN_DIR)",
        },
    }


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _versions() -> dict:
    import onnxruntime
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnxruntime": onnxruntime.__version__}
