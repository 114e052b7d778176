"""`medkd-build recipe=tskd`: segmentation end to end (TS-KD, recipes/tskd.py).

    setup              config, data (a segmentation data set), student, teacher, transfer set:
                       every user mistake fails here, before the run directory is touched
    teacher_tuning     (mode=tskd) LiteMedSAM as a prompt-free K-class segmenter, LoRA-tuned on
                       the labelled slices over cached early-stage tokens; scored on the test
                       split once; LoRA merged (parity checked); teacher.safetensors
    teacher_targets    (tskd, agnostic) the teacher's embedding (and, tskd, mask logits) for
                       every transfer image
    distillation       (tskd, agnostic) the student on the transfer set
    fine_tuning        the student on the labelled slices (mode=scratch: the only stage)
    test_evaluation    Dice and HD95 per class (seg_metrics.py), overlays of a few test slices

Each training stage checkpoints every epoch in run_dir/stages/<stage>/ through the shared
loop (train.fit), so `resume=true` continues where a killed run stopped and a finished stage
is not trained again. The run directory, its lock, the log, the report and the manifest are
the classification build's (pipeline.py, rundir.py, report.py, provenance.py).

    export             the student through the classifiers' export path (export_stage.py):
                       ONNX, fp16/int8 behind parity (pixel agreement) and the int8 guard (on
                       pooled Dice, seg_metrics.pooled_dice), engine or bundle, firmware, latency
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from medkd.recipes import UNLABELLED
from medkd.recipes.tskd import (SupervisedSegmentation, TeacherTargets, TeacherTuning, TransferDistillation)

from .atomic import atomic_save, atomic_write_text
from .data import ImageSet, load_segmentation_task
from .data.augment import draw_view_table, parse_augment
from .data.segmentation import SegmentationTask
from .distributed import DistContext
from .errors import ConfigError, UserError
from .export_stage import deployed_summary, make_segmentation_plan, run_export
from .features import teacher_features
from .models.sam_segmenter import (SAM_EMBED_DIM, FoundationSegmenter, build_foundation_segmenter,
                                   with_segmenter_lora)
from .models.segmenters import build_segmenter
from .models.students import count_parameters
from .models.teacher_runtime import runtime_extractor
from .models.teachers import build_teacher
from .provenance import data_digest, teacher_weights, write_manifest
from .report import write_report
from .rundir import LOG_NAME, OVERLAYS_DIR, STAGES_DIR, check_location
from .seg_metrics import segmentation_scores
from .seg_overlays import write_overlays
from .targets import target_summary
from .train import TrainSettings, fit, predict

SEGMENTATION_RECIPES = ("tskd",)
MODES = ("tskd", "agnostic", "scratch")
# Merging LoRA into the base weights may move the teacher's logits by float rounding only:
# at most this fraction of their largest magnitude (measured ~2e-6 at 128 px).
MERGE_RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class TSKDSettings:
    mode: str
    teacher_steps: int
    distill_epochs: int
    finetune_steps: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    rank: int
    lora_alpha: float
    lora_dropout: float
    ce_weight: float
    dice_weight: float
    feature_weight: float
    logit_weight: float
    temperature: float


def tskd_settings(recipe: DictConfig) -> TSKDSettings:
    """recipe.* of recipe=tskd, each value checked (one-line ConfigError)."""
    if recipe.mode not in MODES:
        raise ConfigError(f"recipe.mode must be one of {', '.join(MODES)}, got '{recipe.mode}'")

    def number(key, low=0.0, strict=True, integer=False):
        value = recipe[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = ok and not isinstance(value, bool) and (value > low if strict else value >= low)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"recipe.{key} must be {kind} {'>' if strict else '>='} {low:g}, got '{value}'")
        return value

    if not 0 <= number("lora_dropout", strict=False) < 1:
        raise ConfigError(f"recipe.lora_dropout must be in [0, 1), got '{recipe.lora_dropout}'")
    return TSKDSettings(
        mode=recipe.mode,
        teacher_steps=number("teacher_steps", integer=True), distill_epochs=number("distill_epochs", integer=True),
        finetune_steps=number("finetune_steps", integer=True), batch_size=number("batch_size", integer=True),
        teacher_lr=float(number("teacher_lr")), student_lr=float(number("student_lr")),
        rank=number("rank", integer=True), lora_alpha=float(number("lora_alpha")),
        lora_dropout=float(recipe.lora_dropout),
        ce_weight=float(number("ce_weight", strict=False)), dice_weight=float(number("dice_weight", strict=False)),
        feature_weight=float(number("feature_weight", strict=False)),
        logit_weight=float(number("logit_weight", strict=False)), temperature=float(number("temperature")),
    )


def transfer_set(task: SegmentationTask, cfg: DictConfig) -> tuple[list[torch.Tensor], dict]:
    """The transfer set's images, in parts (each part's teacher tokens are cached on their
    own), and what they are: every training slice (labelled or not), `transfer.copies`
    augmented copies of each, and the images of `transfer.path`."""
    base = task.train.images if task.unlabelled is None else torch.cat([task.train.images, task.unlabelled])
    parts, described = [base], {"training_slices": len(base)}
    copies = cfg.transfer.copies
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ConfigError(f"transfer.copies must be a non-negative integer, got '{copies}'")
    if copies:
        spec = parse_augment(cfg.transfer.augment, "transfer.augment")
        if spec is None:
            raise ConfigError("transfer.augment is none but transfer.copies > 0; give a spec or transfer.copies=0")
        table = draw_view_table([spec] * len(base), copies + 1, int(cfg.data.seed))
        parts += [table.render_view(base, view) for view in range(1, copies + 1)]
        described.update(augmented_copies=copies * len(base), augment=spec.describe())
    if cfg.transfer.path is not None:
        extra = folder_images(Path(str(cfg.transfer.path)).expanduser(), task.image_size, task.in_chans)
        parts.append(extra)
        described.update(extra_images=len(extra), extra_source=str(Path(str(cfg.transfer.path)).resolve()))
    return parts, described


def folder_images(root: Path, size: int, channels: int) -> torch.Tensor:
    """Every image in `root` (recursively), read like data=folder's, at size x size, `channels` deep."""
    from .data.folder import IMAGE_SUFFIXES, read_image

    if not root.is_dir():
        raise ConfigError(f"transfer.path {root} is not a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not paths:
        raise ConfigError(f"transfer.path {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in paths:
        image = read_image(path, size, 0.0, 1.0)
        if image.shape[0] != channels:  # gray <-> RGB to the task's channels
            image = image.mean(0, keepdim=True) if channels == 1 else image.expand(3, -1, -1)
        images.append(image)
    return torch.stack(images).contiguous()


@dataclass
class SegmentationInputs:
    run_dir: Path
    task: SegmentationTask
    settings: TSKDSettings
    student: torch.nn.Module
    segmenter: FoundationSegmenter | None  # LiteMedSAM, prompt-free, without adapters yet
    transfer: list[torch.Tensor] | None  # its parts: training slices, augmented copies, transfer.path
    transfer_info: dict
    fingerprint: str
    plan: object  # the export plan, checked at setup

    @property
    def transfer_images(self) -> torch.Tensor:
        return torch.cat(self.transfer)


def check_segmentation_inputs(cfg: DictConfig, log) -> SegmentationInputs:
    from .pipeline import resolve_run_dir, training_fingerprint

    run_dir = resolve_run_dir(cfg)
    check_location(run_dir)
    settings = tskd_settings(cfg.recipe)
    task = load_segmentation_task(cfg.data)
    log(f"data: {task.name}  {len(task.train)} labelled / {0 if task.unlabelled is None else len(task.unlabelled)} "
        f"unlabelled train slices / {len(task.test)} test  {task.num_classes} classes  "
        f"{task.in_chans}x{task.image_size}x{task.image_size}")
    student = build_segmenter(cfg.student, task.num_classes, task.in_chans, task.image_size)
    segmenter, transfer, info = None, None, {}
    if settings.mode != "scratch":
        teacher = build_teacher(cfg.teacher)
        if teacher.name != "litemedsam":
            raise ConfigError(f"recipe=tskd distils LiteMedSAM (teacher=litemedsam), not teacher={teacher.name}")
        if teacher.input_size < task.image_size:
            raise ConfigError(f"teacher.input_size={teacher.input_size} is below data.image_size={task.image_size}; "
                              f"the teacher must see the slices at least at their size")
        segmenter = build_foundation_segmenter(teacher, task.num_classes, task.image_size)
        transfer, info = transfer_set(task, cfg)
        log(f"transfer set: {sum(len(part) for part in transfer)} images ({info})")
    fingerprint = training_fingerprint(cfg) + ":" + str(OmegaConf.to_container(cfg.transfer))
    plan = make_segmentation_plan(cfg, task)
    return SegmentationInputs(run_dir, task, settings, student, segmenter, transfer, info, fingerprint, plan)


def epochs_for_steps(steps: int, images: int, batch_size: int) -> int:
    """Whole epochs over `images` that make at least `steps` optimizer steps. The labelled
    stages are sized in steps so that every label budget trains as long (10 slices for 8
    epochs would be 24 steps: the teacher stays at background)."""
    return math.ceil(steps / math.ceil(images / batch_size))


def stage_settings(settings: TSKDSettings, epochs: int, lr: float, cfg: DictConfig, progress) -> TrainSettings:
    return TrainSettings(epochs=epochs, batch_size=settings.batch_size, lr=lr, weight_decay=cfg.train.weight_decay,
                         seed=cfg.seed, progress=progress, precision=cfg.train.precision)


@torch.no_grad()
def batched(fn, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [fn(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]


def early_tokens(cfg: DictConfig, inputs: SegmentationInputs, progress, device: torch.device):
    """tokens(images, split): the frozen early stages' output, run by teacher.backend (as the
    classification build's teacher features, a torch backend on the training device) and cached
    in cache_dir per image tensor."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    extractor = runtime_extractor(inputs.segmenter.early, cfg.teacher.backend, cfg.teacher.precision, cache,
                                  calibration_images=inputs.task.train.images)

    def tokens(images: torch.Tensor, split: str) -> torch.Tensor:
        return teacher_features(extractor, images, cache, cfg.train.teacher_batch_size,
                                desc=f"teacher early stages ({split})", progress=progress, device=device)
    return tokens


def tune_teacher(cfg, inputs: SegmentationInputs, tokens_of, progress, log, ctx: DistContext) -> dict:
    """Stage 1: LoRA-tune inputs.segmenter, merge it in place; its report section."""
    task, s = inputs.task, inputs.settings
    segmenter = with_segmenter_lora(inputs.segmenter, s.rank, s.lora_alpha, s.lora_dropout)
    recipe = TeacherTuning(segmenter, s.ce_weight, s.dice_weight)
    result = fit(recipe, task.train, None, stage_settings(s, epochs_for_steps(s.teacher_steps, len(task.train), s.batch_size), s.teacher_lr,
                                    cfg, progress),
                 inputs.run_dir / STAGES_DIR / "teacher", inputs.fingerprint, tokens_of(task.train.images, "train"),
                 resume=cfg.resume, log=log, device=ctx.device, dist=ctx)
    segmenter.eval()
    test_tokens = tokens_of(task.test.images, "test")
    unmerged = torch.cat(batched(segmenter.from_intermediate, test_tokens, s.batch_size))
    trained = sum(p.numel() for p in segmenter.parameters() if p.requires_grad)
    segmenter.merge_and_unload()
    merged = torch.cat(batched(segmenter.from_intermediate, test_tokens, s.batch_size))
    diff = float((merged - unmerged).abs().max())
    relative = diff / max(float(unmerged.abs().max()), 1e-12)
    if relative > MERGE_RELATIVE_TOLERANCE:
        raise UserError(f"merging the teacher's LoRA weights moved its logits by {diff:.3g} ({relative:.2g} of "
                        f"their range, limit {MERGE_RELATIVE_TOLERANCE:g}); report this as a bug")
    weights = {k: v.detach().contiguous() for k, v in segmenter.state_dict().items()}
    atomic_save(inputs.run_dir / "teacher.safetensors", lambda tmp: save_file(weights, str(tmp)))
    scores = segmentation_scores(merged.argmax(1), task.test.masks, task.class_names, pixel_spacing(task))
    log(f"teacher (LoRA-tuned, merged) test mean Dice {scores['mean_dice']:.4f}")
    return {"history": result.history, "trainable_parameters": trained, "parameters": count_parameters(segmenter),
            "merge_parity": {"max_abs_diff": diff, "relative": relative},
            "test": scores, "weights": "teacher.safetensors (LoRA merged)"}


@torch.no_grad()
def teacher_targets(inputs: SegmentationInputs, tokens_of, with_masks: bool, batch_size: int) -> tuple:
    """(rows, TeacherTargets) for every transfer image: the segmenter's image embedding and,
    with_masks (tskd: the tuned teacher), its mask logits; without (agnostic: the un-tuned
    encoder), the embedding alone."""
    task, segmenter = inputs.task, inputs.segmenter.eval()
    targets = TeacherTargets(channels=SAM_EMBED_DIM, grid=inputs.student.grid,
                             num_classes=task.num_classes if with_masks else 0, size=task.image_size)

    def rows(tokens):
        embedding = segmenter.late.embedding(tokens)
        if not with_masks:
            return targets.pack(embedding)
        return targets.pack(embedding, segmenter.to_image_size(segmenter.late.decoder(embedding)))

    names = ("training slices", "augmented copies", "transfer.path")
    tokens = [tokens_of(part, f"transfer: {names[min(i, 2)]}") for i, part in enumerate(inputs.transfer)]
    return torch.cat(batched(rows, torch.cat(tokens), batch_size)), targets


def run_segmentation(cfg: DictConfig, ctx: DistContext) -> dict:
    from .pipeline import RunLog, main_rank_holds, start_run

    if ctx.enabled:
        raise UserError("recipe=tskd runs in one process; start it without torchrun")
    log = RunLog()
    begun = start_run(cfg, log)
    started, started_at, progress, source, stages = (begun.started, begun.started_at, begun.progress,
                                                     begun.source, begun.stages)
    with stages("setup", quiet_start=True):
        inputs = check_segmentation_inputs(cfg, log)
    run_dir, task, s = inputs.run_dir, inputs.task, inputs.settings

    with main_rank_holds(ctx, run_dir, cfg, inputs.fingerprint):
        log.attach(run_dir / LOG_NAME)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        log(f"run directory: {run_dir}  (recipe=tskd mode={s.mode})")
        report_teacher, histories = None, {}
        if s.mode != "scratch":
            tokens_of = early_tokens(cfg, inputs, progress, ctx.device)
            if s.mode == "tskd":
                with stages("teacher_tuning"):
                    report_teacher = tune_teacher(cfg, inputs, tokens_of, progress, log, ctx)
            with stages("teacher_targets"):
                rows, targets = teacher_targets(inputs, tokens_of, s.mode == "tskd", cfg.train.teacher_batch_size)
                inputs.segmenter = None  # not needed past this point
            with stages("distillation"):
                recipe = TransferDistillation(inputs.student, targets, s.feature_weight,
                                              s.logit_weight if targets.num_classes else 0.0, s.temperature)
                images = inputs.transfer_images
                transfer = ImageSet(images, torch.full((len(images),), UNLABELLED))
                histories["distillation"] = fit(
                    recipe, transfer, None, stage_settings(s, s.distill_epochs, s.student_lr, cfg, progress),
                    run_dir / STAGES_DIR / "distillation", inputs.fingerprint, rows, resume=cfg.resume, log=log,
                    device=ctx.device, dist=ctx).history
        with stages("fine_tuning"):
            recipe = SupervisedSegmentation(inputs.student, s.ce_weight, s.dice_weight)
            histories["fine_tuning"] = fit(
                recipe, task.train, None, stage_settings(s, epochs_for_steps(s.finetune_steps, len(task.train), s.batch_size),
                                              s.student_lr, cfg, progress),
                run_dir / STAGES_DIR / "fine_tuning", inputs.fingerprint, resume=cfg.resume, log=log,
                device=ctx.device, dist=ctx).history
        with stages("test_evaluation", quiet_start=True):
            student = inputs.student.eval()
            predicted = predict(student, task.test.images, batch_size=s.batch_size).argmax(1)
            scores = segmentation_scores(predicted, task.test.masks, task.class_names, pixel_spacing(task))
            overlays = write_overlays(run_dir / OVERLAYS_DIR, task.test.images, task.test.masks, predicted,
                                      task.class_names)
        weights = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
        atomic_save(run_dir / "student.safetensors", lambda tmp: save_file(weights, str(tmp)))
        with stages("export"):
            export = run_export(cfg, run_dir, task, {"model": student}, inputs.plan, log, progress)
        report = {
            "run": {"recipe": "tskd", "mode": s.mode, "run_dir": str(run_dir), "seed": cfg.seed,
                    "wall_time_s": round(time.perf_counter() - started, 1), "stage_seconds": dict(stages.seconds),
                    "started_at": started_at, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "data": {"name": task.name, "train": len(task.train),
                     "unlabelled": 0 if task.unlabelled is None else len(task.unlabelled), "test": len(task.test),
                     "num_classes": task.num_classes, "class_names": task.class_names,
                     "image_shape": [task.in_chans, task.image_size, task.image_size], "provenance": task.provenance},
            "transfer_set": {"images": sum(len(part) for part in inputs.transfer or []), **inputs.transfer_info},
            "teacher": None if s.mode == "scratch" else {**OmegaConf.to_container(cfg.teacher),
                                                         **(report_teacher or {"tuned": False})},
            "student": {"name": cfg.student.name, "parameters": count_parameters(student)},
            "training": {"settings": OmegaConf.to_container(cfg.recipe), "histories": histories},
            "segmentation": {"test": scores, "overlays": overlays},
            "export": export,
            "target": target_summary(cfg.target, export),
            "provenance": {"medkd_source": source, "data": data_digest(task),  # masks are the labels
                           "teacher_weights": None if s.mode == "scratch" else teacher_weights(cfg.teacher),
                           "manifest": "manifest.sha256 (check with: medkd-verify RUN_DIR)"},
        }
        md_path, _ = write_report(run_dir, report)
        unit = "mm" if task.provenance.get("pixel_spacing_mm") else "px"
        log(f"test mean Dice {scores['mean_dice']:.4f}, mean HD95 {scores['mean_hd95_mm']:.2f} {unit} "
            f"(PyTorch fp32); {deployed_summary(export)}; report: {md_path}")
        write_manifest(run_dir)
        return report


def pixel_spacing(task: SegmentationTask) -> float:
    """mm per pixel where the data set knows it (mri-seg), else 1 (distances in pixels)."""
    return float(task.provenance.get("pixel_spacing_mm") or 1.0)
