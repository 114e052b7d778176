"""`medkd-build` end to end: data -> teacher features -> recipe training -> export -> report.

Everything the user can get wrong (data, model names, weights, run directory) is
checked before the run directory is touched, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from medkd.export.run_export import STAGING, previous_artifacts
from medkd.recipes import build_recipe

from .atomic import atomic_save, atomic_write_text
from .checkpoint import CHECKPOINT_NAME, config_fingerprint
from .config import default_run_dir
from .data import load_task
from .data.base import ImageSet
from .errors import UserError
from .export_stage import deployed_summary, make_plan, run_export, training_pool
from .features import teacher_features
from .models.students import build_student, count_parameters
from .models.teachers import build_teacher
from .report import write_report
from .targets import target_summary
from .train import TrainSettings, accuracy, fit, predict

ARTIFACTS = ("config.yaml", CHECKPOINT_NAME, "student.safetensors", "report.json", "report.md")


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


def progress_setting(cfg: DictConfig) -> bool | None:
    return None if cfg.progress == "auto" else bool(cfg.progress)


def prepare_run_dir(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    has_previous = run_dir.exists() and any((run_dir / name).exists() for name in ARTIFACTS)
    if has_previous and not (cfg.resume or cfg.overwrite):
        raise UserError(
            f"{run_dir} already holds a run; pass resume=true to continue it, "
            "overwrite=true to replace it, or run_dir=NEW_DIR"
        )
    if cfg.overwrite and run_dir.exists():
        for name in ARTIFACTS:
            (run_dir / name).unlink(missing_ok=True)
        for path in [*previous_artifacts(run_dir, "model"), run_dir / STAGING]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def run(cfg: DictConfig) -> dict:
    log = RunLog()
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    progress = progress_setting(cfg)

    # 1. Everything that can fail on user input, before any file is written.
    task = load_task(cfg.data)
    log(
        f"data: {task.name}  {len(task.train)} train / {len(task.test)} test  "
        f"{task.num_classes} classes  {task.in_chans}x{task.image_size}x{task.image_size}"
    )
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    teacher = build_teacher(cfg.teacher) if cfg.recipe.needs_teacher else None
    recipe = build_recipe(cfg.recipe, student, teacher.feature_dim if teacher else None)
    train = training_set(task, recipe)
    if len(train) > len(task.train):
        log(f"transfer set: + {len(train) - len(task.train)} training images with withheld labels")
    plan = make_plan(cfg, task)
    run_dir = prepare_run_dir(cfg)
    log.attach(run_dir / "log.txt")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    log(f"run directory: {run_dir}")

    stage_seconds = {"setup": round(time.perf_counter() - started, 1)}
    mark = time.perf_counter()

    # 2. Frozen-teacher features, once per image set (cached across runs).
    train_features = test_features = teacher_info = None
    if teacher is not None:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        train_features = teacher_features(
            teacher, train.images, cache_dir, cfg.train.teacher_batch_size,
            desc="teacher features (train)", progress=cfg.progress
        )
        test_features = teacher_features(
            teacher, task.test.images, cache_dir, cfg.train.teacher_batch_size,
            desc="teacher features (test)", progress=cfg.progress
        )
        teacher_info = {**OmegaConf.to_container(cfg.teacher), "feature_dim": teacher.feature_dim,
                        "weights": cfg.teacher.checkpoint or f"shipped with the package ({teacher.fingerprint})"}
        del teacher  # the frozen model is not needed past this point

    stage_seconds["teacher_features"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()

    # 3. Train with per-epoch checkpoints.
    settings = TrainSettings(
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.seed,
        progress=progress,
    )
    result = fit(
        recipe,
        train,
        task.test,
        settings,
        run_dir,
        training_fingerprint(cfg),
        train_features,
        test_features,
        resume=cfg.resume,
        log=log,
    )
    deployable = recipe.deployable().eval()
    student_accuracy = accuracy(predict(deployable, task.test.images), task.test.labels)
    atomic_save(run_dir / "student.safetensors", lambda tmp: save_file(_contiguous(deployable.state_dict()), str(tmp)))

    stage_seconds["training"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()

    # 4. Export for the target: fold, ONNX, fp16/int8 behind parity and the accuracy guard,
    #    TensorRT engine or on-device bundle, firmware container, latency, plots.
    export = run_export(cfg, run_dir, task, recipe.deployables(), plan, log, progress)

    report = {
        "run": {
            "recipe": cfg.recipe.name,
            "run_dir": str(run_dir),
            "seed": cfg.seed,
            "resumed_from_epoch": result.resumed_from_epoch,
            "wall_time_s": round(time.perf_counter() - started, 1),
            "stage_seconds": {**stage_seconds, "export": round(time.perf_counter() - mark, 1)},
            "started_at": started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "medkd-build " + " ".join(sys.argv[1:]) if sys.argv and "medkd-build" in sys.argv[0] else None,
            "versions": _versions(),
        },
        "data": {"name": task.name, "train": len(task.train), "test": len(task.test),
                 "unlabelled_transfer_set": len(train) - len(task.train),
                 "num_classes": task.num_classes, "class_names": task.class_names,
                 "image_shape": [task.in_chans, task.image_size, task.image_size],
                 "provenance": task.provenance},
        "teacher": teacher_info,
        "student": {"name": cfg.student.name, "parameters": count_parameters(deployable)},
        "training": {"epochs": cfg.train.epochs, "history": result.history,
                     "test_accuracy": student_accuracy,
                     "teacher_test_accuracy": result.history[-1].get("teacher_test_accuracy") if result.history else None},
        "export": export,
        "target": target_summary(cfg.target, export),
    }
    md_path, json_path = write_report(run_dir, report)
    log(f"test accuracy {student_accuracy:.4f} (PyTorch fp32); {deployed_summary(export)}; report: {md_path}")
    return report


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _versions() -> dict:
    import onnxruntime
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnxruntime": onnxruntime.__version__}
