"""`medkd-build recipe=ogkd`: prompt tuning a frozen vision-language model, folded for deployment.

    setup            config, data, the VLM (teacher=lit-vlm | open_clip), base/novel classes,
                     export plan: every user mistake fails here, before the run directory
    image_tokens     the frozen image encoder's tokens for every image (cached, teacher.backend)
    alignment        (teacher=lit-vlm only) its projections and logit scale, trained on every
                     training image of the base classes and their descriptions (recipes/ogkd.py
                     Alignment): the demonstration VLM's "pretraining", before any prompt; cached
                     in cache_dir like the image tokens, keyed by everything it depends on
    prompt_tuning    the context vectors, on the base classes' few shots (recipe.objective:
                     ogkd | coop | kd)
    test_evaluation  base and novel accuracy (each among its own classes) and their harmonic
                     mean, beside the frozen model's zero-shot accuracy (template ensemble)
    fold             the prompts folded into a linear classifier over every class (base and
                     novel) after the image encoder (models/vlm.py FoldedPromptClassifier; parity
                     with the prompt-tuned model checked)
    student_distillation  (recipe.deploy=student) a small student=... distilled from the folded
                     model with the geometry-aware loss (recipes/ogkd.py GeometryStudent) on the
                     base classes' training images: labels on the shots only, the rest a transfer set
    export           the deployed model (folded, or the student) through the shared export path

Base-to-novel split: classes in data order, even positions base, odd positions novel, so both
halves span every lobe of data=mri-regions. recipe.protocol=all trains on every class (few-shot).
Only base-class images train anything: the alignment stage and the prompts never see a novel
class's image or description. The novel class NAMES enter the class graph when
recipe.novel_in_graph (the official code's default), as text only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from medkd.recipes import UNLABELLED
from medkd.recipes.ogkd import (LOSSES, Alignment, GeometryStudent, OGKDWeights, PromptLearner, PromptTuning,
                                class_graph, effective_base_graph)

from .atomic import atomic_save, atomic_write_text
from .data import load_task
from .data.base import ImageSet, TaskData
from .data.region_text import GENERIC_TEMPLATES, descriptions
from .distributed import DistContext
from .errors import ConfigError, UserError
from .export_stage import deployed_summary, make_plan, run_export
from .features import images_digest, teacher_features
from .models.students import build_student, count_parameters
from .models.teacher_runtime import runtime_extractor
from .models.vlm import FoldedPromptClassifier, build_vlm
from .provenance import data_digest, write_manifest
from .report import write_report
from .rundir import LOG_NAME, STAGES_DIR, check_location
from .targets import target_summary
from .train import TrainSettings, fit, predict

VLM_RECIPES = ("ogkd",)
PROTOCOLS = ("base2novel", "all")
DEPLOYS = ("folded", "student")
# Folding is exact algebra: folded and prompt-tuned logits may differ by float rounding only.
FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class OGKDSettings:
    weights: OGKDWeights
    protocol: str
    shots: int | None
    val_per_class: int
    n_ctx: int
    class_specific: bool
    epochs: int
    batch_size: int
    lr: float
    graph_alpha: float
    lambda_novel: float
    novel_in_graph: bool
    align_epochs: int
    align_lr: float
    deploy: str
    student_epochs: int
    student_lr: float
    student_kd_weight: float
    student_temperature: float


def ogkd_settings(recipe: DictConfig) -> OGKDSettings:
    """recipe.* of recipe=ogkd, each value checked (one-line ConfigError)."""
    def number(key, low=0.0, strict=False, integer=False):
        value = recipe[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = ok and not isinstance(value, bool) and (value > low if strict else value >= low)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"recipe.{key} must be {kind} {'>' if strict else '>='} {low:g}, got '{value}'")
        return value

    for key, choices in (("objective", LOSSES), ("protocol", PROTOCOLS), ("deploy", DEPLOYS)):
        if recipe[key] not in choices:
            raise ConfigError(f"recipe.{key} must be one of {', '.join(choices)}, got '{recipe[key]}'")
    for key in ("class_specific", "novel_in_graph"):
        if not isinstance(recipe[key], bool):
            raise ConfigError(f"recipe.{key} must be true or false, got '{recipe[key]}'")
    if recipe.class_specific and recipe.protocol == "base2novel":
        raise ConfigError("recipe.class_specific=true learns one context per base class, which cannot serve novel "
                          "classes; use recipe.protocol=all or class_specific=false")
    for key in ("top_k_ratio", "student_kd_weight"):
        if not 0 < number(key, strict=True) <= 1:
            raise ConfigError(f"recipe.{key} must be in (0, 1], got '{recipe[key]}'")
    shots = None if recipe.shots is None else number("shots", 0, strict=True, integer=True)
    weights = OGKDWeights(loss=recipe.objective, lambda_sccm=float(number("lambda_sccm")),
                          lambda_gad=float(number("lambda_gad")), lambda_lgd=float(number("lambda_lgd")),
                          gamma=float(number("gamma")), top_k_ratio=float(recipe.top_k_ratio),
                          tau=float(number("tau", strict=True)))
    return OGKDSettings(weights=weights, protocol=recipe.protocol, shots=shots,
                        val_per_class=number("val_per_class", integer=True),
                        n_ctx=number("n_ctx", strict=True, integer=True), class_specific=recipe.class_specific,
                        epochs=number("epochs", strict=True, integer=True),
                        batch_size=number("batch_size", strict=True, integer=True),
                        lr=float(number("lr", strict=True)), graph_alpha=float(number("graph_alpha")),
                        lambda_novel=float(number("lambda_novel")), novel_in_graph=recipe.novel_in_graph,
                        align_epochs=number("align_epochs", integer=True),
                        align_lr=float(number("align_lr", strict=True)), deploy=recipe.deploy,
                        student_epochs=number("student_epochs", strict=True, integer=True),
                        student_lr=float(number("student_lr", strict=True)),
                        student_kd_weight=float(recipe.student_kd_weight),
                        student_temperature=float(number("student_temperature", strict=True)))


def split_classes(num_classes: int, protocol: str) -> tuple[list[int], list[int]]:
    """(base, novel) class indices: alternate classes (see the module docstring), or all base."""
    if protocol == "all":
        return list(range(num_classes)), []
    if num_classes < 2:
        raise UserError(f"recipe.protocol=base2novel needs at least 2 classes, the data set has {num_classes}")
    return list(range(0, num_classes, 2)), list(range(1, num_classes, 2))


def few_shots(labels: torch.Tensor, classes: list[int], shots: int | None) -> torch.Tensor:
    """Indices of `shots` images per class in `classes` (all when None), evenly spaced through
    each class's images in data order (spread over the volume), the same for every objective."""
    chosen = []
    for cls in classes:
        members = torch.nonzero(labels == cls).flatten()
        if shots is not None and len(members) > shots:
            members = members[torch.linspace(0, len(members) - 1, shots).round().long()]
        chosen.append(members)
    return torch.cat(chosen)


def training_side_split(labels: torch.Tensor, classes: int, shots: int | None,
                        val_per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shots, validation, aligned) indices into the base classes' training images: the shots
    train the prompts; `val_per_class` other images per class, evenly spaced, choose settings
    (never the test split); the alignment stage (lit-vlm) trains on everything but validation."""
    every = torch.arange(len(labels))
    chosen = few_shots(labels, list(range(classes)), shots)
    rest = every[~torch.isin(every, chosen)]
    validation = rest[few_shots(labels[rest], list(range(classes)), val_per_class)] if val_per_class else rest[:0]
    return chosen, validation, every[~torch.isin(every, validation)]


@torch.no_grad()
def validation_accuracy(recipe: PromptTuning, features: torch.Tensor, labels: torch.Tensor,
                        templates: torch.Tensor, scale) -> dict:
    """Base-class accuracy of the tuned prompts (and of zero-shot) on the validation images."""
    if not len(labels):
        return {}
    logits = scale * features @ recipe.text_features().t()
    return {"base": (logits.argmax(1) == labels).float().mean().item(),
            "zero_shot_base": zero_shot_accuracy(features, labels, templates, scale)}


def remap(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Global class ids -> positions in `classes`."""
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    return lookup[labels]


def class_texts(task: TaskData) -> list[list[str]]:
    """Descriptions of every class: the region templates where the data set knows each class's
    lobe (data=mri-regions), else the generic ones."""
    lobes = task.provenance.get("class_lobe") if isinstance(task.provenance, dict) else None
    if lobes:
        return [descriptions(name, lobes[name]) for name in task.class_names]
    return [[template.format(name=name) for template in GENERIC_TEMPLATES] for name in task.class_names]


@dataclass
class VLMInputs:
    run_dir: Path
    task: TaskData
    settings: OGKDSettings
    vlm: torch.nn.Module
    base: list[int]
    novel: list[int]
    texts: list[list[str]]
    fingerprint: str
    plan: object


def check_vlm_inputs(cfg: DictConfig, log) -> VLMInputs:
    from .pipeline import resolve_run_dir, training_fingerprint

    run_dir = resolve_run_dir(cfg)
    check_location(run_dir)
    settings = ogkd_settings(cfg.recipe)
    task = load_task(cfg.data)
    base, novel = split_classes(task.num_classes, settings.protocol)
    log(f"data: {task.name}  {len(task.train)} train / {len(task.test)} test  {task.num_classes} classes "
        f"({len(base)} base, {len(novel)} novel)  {task.in_chans}x{task.image_size}x{task.image_size}")
    vlm = build_vlm(cfg.teacher)
    plan = make_plan(cfg, task)
    return VLMInputs(run_dir, task, settings, vlm, base, novel, class_texts(task), training_fingerprint(cfg), plan)


def image_tokens(cfg: DictConfig, inputs: VLMInputs, progress):
    """tokens(images, split): the frozen image encoder's output, run by teacher.backend and cached."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    extractor = runtime_extractor(inputs.vlm.image_encoder, cfg.teacher.backend, cfg.teacher.precision, cache,
                                  calibration_images=inputs.task.train.images)

    def tokens(images: torch.Tensor, split: str) -> torch.Tensor:
        return teacher_features(extractor, images, cache, cfg.train.teacher_batch_size,
                                desc=f"VLM image tokens ({split})", progress=progress)
    return tokens


@torch.no_grad()
def text_hidden(vlm, texts: list[list[str]]) -> torch.Tensor:
    """C x K x Dt: the frozen text encoder's pooled output for every description (lit-vlm)."""
    flat = [text for per_class in texts for text in per_class]
    ids, mask = vlm.tokenize(flat)
    return vlm.text_hidden(vlm.token_embedding(ids), mask).view(len(texts), len(texts[0]), -1)


@torch.no_grad()
def template_features(vlm, texts: list[list[str]]) -> torch.Tensor:
    """C x K x D normalised: every description through the frozen text side."""
    flat = [text for per_class in texts for text in per_class]
    return F.normalize(vlm.encode_texts(flat), dim=-1).view(len(texts), len(texts[0]), -1)


def zero_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, templates: torch.Tensor, scale) -> float:
    prototypes = F.normalize(templates.mean(dim=1), dim=-1)
    return ((scale * features @ prototypes.t()).argmax(1) == labels).float().mean().item()


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def run_vlm(cfg: DictConfig, ctx: DistContext) -> dict:
    from .pipeline import RunLog, main_rank_holds, start_run

    if ctx.enabled:
        raise UserError("recipe=ogkd runs in one process; start it without torchrun")
    log = RunLog()
    begun = start_run(cfg, log)
    started, started_at, progress, source, stages = (begun.started, begun.started_at, begun.progress,
                                                     begun.source, begun.stages)
    with stages("setup", quiet_start=True):
        inputs = check_vlm_inputs(cfg, log)
    run_dir, task, s, vlm = inputs.run_dir, inputs.task, inputs.settings, inputs.vlm
    base, novel = inputs.base, inputs.novel

    with main_rank_holds(ctx, run_dir, cfg, inputs.fingerprint):
        log.attach(run_dir / LOG_NAME)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        log(f"run directory: {run_dir}  (recipe=ogkd objective={s.weights.loss} protocol={s.protocol})")
        base_train = few_shots(task.train.labels, base, None)
        base_set = ImageSet(task.train.images[base_train], remap(task.train.labels[base_train], base))
        shots, validation, aligned = training_side_split(base_set.labels, len(base), s.shots, s.val_per_class)
        train = base_set.subset(shots)
        with stages("image_tokens"):
            tokens_of = image_tokens(cfg, inputs, progress)
            base_tokens = tokens_of(base_set.images, "train, base classes")
            test_tokens = tokens_of(task.test.images, "test")
        alignment = None
        if vlm.needs_alignment:
            with stages("alignment"):
                alignment = align(cfg, inputs, base_set.subset(aligned), base_tokens[aligned], progress, log)
        vlm.freeze()
        scale = vlm.logit_scale.exp()
        templates = template_features(vlm, inputs.texts)  # every class: the teacher and the graph
        graph = class_graph(templates.mean(dim=1), s.graph_alpha)
        if s.novel_in_graph:
            graph = effective_base_graph(graph, torch.tensor(base), s.lambda_novel)
        else:
            graph = class_graph(templates[base].mean(dim=1), s.graph_alpha)
        with stages("prompt_tuning"):
            learner = PromptLearner(vlm, [task.class_names[c] for c in base], s.n_ctx, s.class_specific)
            recipe = PromptTuning(vlm, learner, templates[base], graph, s.weights)
            settings = TrainSettings(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                                     weight_decay=cfg.train.weight_decay, seed=cfg.seed, progress=progress)
            history = fit(recipe, train, None, settings, run_dir / STAGES_DIR / "prompt_tuning", inputs.fingerprint,
                          vlm.image_features(base_tokens[shots]), resume=cfg.resume, log=log).history
        with stages("test_evaluation", quiet_start=True):
            checked = validation_accuracy(recipe, vlm.image_features(base_tokens[validation])[:, 0],
                                          base_set.labels[validation], templates[base], scale)
            if checked:
                log("validation accuracy (base classes, training side): " +
                    ", ".join(f"{k} {v:.4f}" for k, v in checked.items()))
            scores = evaluate(inputs, recipe, vlm.image_features(test_tokens)[:, 0], templates, scale)
            log("test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in scores["prompt_tuned"].items()
                                              if v is not None))
        with stages("fold"):
            folded, fold_report = fold(inputs, recipe)
        atomic_save(run_dir / "prompts.safetensors",
                    lambda tmp: save_file({"ctx": learner.ctx.detach().contiguous()}, str(tmp)))
        deployed = {"name": "folded prompt classifier (VLM image encoder + linear)", "model": folded}
        if s.deploy == "student":
            with stages("student_distillation"):
                deployed = distil_student(cfg, inputs, folded, templates, base_set, (shots, validation),
                                          (base_tokens, test_tokens), progress, log)
        with stages("export"):
            export = run_export(cfg, run_dir, task, {"model": deployed["model"]}, inputs.plan, log, progress)
        report = {
            "run": {"recipe": "ogkd", "objective": s.weights.loss, "protocol": s.protocol, "run_dir": str(run_dir),
                    "seed": cfg.seed, "wall_time_s": round(time.perf_counter() - started, 1),
                    "stage_seconds": dict(stages.seconds), "started_at": started_at,
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "data": {"name": task.name, "train": len(task.train), "test": len(task.test),
                     "num_classes": task.num_classes, "class_names": task.class_names,
                     "base_classes": [task.class_names[c] for c in base],
                     "novel_classes": [task.class_names[c] for c in novel], "shots_per_class": s.shots,
                     "validation_per_class": s.val_per_class,
                     "prompt_tuning_images": len(train),
                     "image_shape": [task.in_chans, task.image_size, task.image_size], "provenance": task.provenance},
            "teacher": {**OmegaConf.to_container(cfg.teacher), "alignment": alignment,
                        "demonstration_vlm": vlm.needs_alignment},
            "training": {"settings": OmegaConf.to_container(cfg.recipe), "history": history,
                         "trainable_parameters": learner.ctx.numel(), "class_graph_novel_names": s.novel_in_graph},
            "vlm": {"validation": {**checked, "images": len(validation)}, "test": scores, "fold": fold_report, "deployed_classes": len(task.class_names)},
            "student": {**{k: v for k, v in deployed.items() if k != "model"},
                        "parameters": count_parameters(deployed["model"])},
            "export": export,
            "target": target_summary(cfg.target, export),
            "provenance": {"medkd_source": source, "data": data_digest(task),
                           "manifest": "manifest.sha256 (check with: medkd-verify RUN_DIR)"},
        }
        md_path, _ = write_report(run_dir, report)
        log(f"{deployed_summary(export)}; report: {md_path}")
        write_manifest(run_dir)
        return report


def distil_student(cfg: DictConfig, inputs: VLMInputs, folded: torch.nn.Module, templates: torch.Tensor,
                   base_set: ImageSet, shots_and_validation, tokens, progress, log) -> dict:
    """recipe.deploy=student: student=... trained on the base classes' training images (labels on
    the shots only; validation held out) to match the folded model's logits over every class
    with the geometry-aware loss; scored on the test split beside the folded model."""
    s, task, vlm = inputs.settings, inputs.task, inputs.vlm
    (shots, validation), (base_tokens, test_tokens) = shots_and_validation, tokens
    with torch.no_grad():
        base_logits = folded.classifier(vlm.image_features(base_tokens)[:, 0])
        test_logits = folded.classifier(vlm.image_features(test_tokens)[:, 0])
    every = torch.arange(len(base_set))
    labels = torch.tensor(inputs.base)[base_set.labels]  # global class ids
    shown = torch.where(torch.isin(every, shots), labels, torch.full_like(labels, UNLABELLED))
    rows = every[~torch.isin(every, validation)]
    val = ImageSet(base_set.images[validation], labels[validation]) if len(validation) else None
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    recipe = GeometryStudent(student, class_graph(templates.mean(dim=1), s.graph_alpha), s.weights.gamma,
                             s.student_kd_weight, s.student_temperature)
    settings = TrainSettings(epochs=s.student_epochs, batch_size=s.batch_size, lr=s.student_lr,
                             weight_decay=cfg.train.weight_decay, seed=cfg.seed, progress=progress)
    log(f"student {cfg.student.name}: {len(rows)} base-class training images ({len(shots)} labelled), "
        f"targets: the folded model's logits over {task.num_classes} classes")
    result = fit(recipe, ImageSet(base_set.images[rows], shown[rows]), val, settings,
                 inputs.run_dir / STAGES_DIR / "student_distillation", inputs.fingerprint, base_logits[rows],
                 base_logits[validation] if val is not None else None, resume=cfg.resume, log=log)
    model = recipe.deployable().eval()
    scores = {"student": split_accuracies(predict(model, task.test.images), task.test.labels, inputs),
              "folded_teacher": split_accuracies(test_logits, task.test.labels, inputs)}
    log("student test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in scores["student"].items() if v is not None))
    return {"name": cfg.student.name, "model": model,
            "distillation": {"history": result.history, "train_images": len(rows), "labelled": len(shots),
                             "validation_images": len(validation), "test": scores}}


def split_accuracies(logits: torch.Tensor, labels: torch.Tensor, inputs: VLMInputs) -> dict:
    """Accuracy among every class, and on base / novel images each among its own classes."""
    result = {"all": (logits.argmax(1) == labels).float().mean().item()}
    for split, classes in (("base", inputs.base), ("novel", inputs.novel)):
        rows = torch.isin(labels, torch.tensor(classes, dtype=torch.long))
        if not classes or not rows.any():
            result[split] = None
            continue
        columns = logits[rows][:, torch.tensor(classes)]
        result[split] = (columns.argmax(1) == remap(labels[rows], classes)).float().mean().item()
    result["harmonic_mean"] = harmonic_mean(result["base"], result["novel"])
    return result


def _alignment_parameters(vlm) -> dict[str, torch.Tensor]:
    """What the alignment stage trains, under the names it is saved by (run folder and cache)."""
    return {"image_projection": vlm.image_projection.weight, "text_projection": vlm.text_projection.weight,
            "logit_scale": vlm.logit_scale}


def alignment_weights(vlm) -> dict[str, torch.Tensor]:
    # safetensors entries are at least 1-d: the scalar logit scale is saved as shape (1,).
    return {k: p.detach().reshape(p.shape or (1,)).contiguous() for k, p in _alignment_parameters(vlm).items()}


def alignment_cache_path(cfg: DictConfig, inputs: VLMInputs, train: ImageSet, hidden: torch.Tensor) -> Path | None:
    """cache_dir/vlm-alignment-<key>.safetensors, the key a digest of everything the stage's result
    depends on: the image encoder's fingerprint, the frozen description features, the images and
    labels, the starting weights (architecture and seed) and the training settings."""
    if not cfg.cache_dir:
        return None
    s, vlm = inputs.settings, inputs.vlm
    digest = hashlib.sha256(vlm.image_encoder.fingerprint.encode())
    for tensor in (hidden, train.images, train.labels, *alignment_weights(vlm).values()):
        digest.update(images_digest(tensor).encode())
    digest.update(json.dumps([s.align_epochs, s.align_lr, s.batch_size, float(cfg.train.weight_decay),
                              int(cfg.seed)]).encode())
    return Path(cfg.cache_dir) / f"vlm-alignment-{digest.hexdigest()[:32]}.safetensors"


def _load_alignment(path: Path, vlm) -> list | None:
    """Copy a cached alignment into `vlm`; its training history, or None if the file is damaged."""
    try:
        targets = _alignment_parameters(vlm)
        with safe_open(str(path), "pt") as f:
            weights = {k: f.get_tensor(k) for k in targets}
            history = json.loads(f.metadata()["history"])
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(weights[key].reshape(target.shape))
    except Exception as exc:  # truncated file, missing key, wrong shape
        warnings.warn(f"alignment cache {path} is unreadable ({type(exc).__name__}); training it again",
                      RuntimeWarning, stacklevel=2)
        return None
    return history


def align(cfg: DictConfig, inputs: VLMInputs, train: ImageSet, train_tokens: torch.Tensor, progress, log) -> dict:
    """The lit-vlm projections on base-class images and their descriptions, taken from the cache
    when the same inputs were aligned before; saved to the run either way."""
    s, vlm = inputs.settings, inputs.vlm
    hidden = text_hidden(vlm, [inputs.texts[c] for c in inputs.base])
    cached = alignment_cache_path(cfg, inputs, train, hidden)
    history = _load_alignment(cached, vlm) if cached is not None and cached.is_file() else None
    from_cache = history is not None
    if from_cache:
        log(f"alignment: from the cache ({cached.name})")
    else:
        recipe = Alignment(vlm, hidden)
        settings = TrainSettings(epochs=s.align_epochs, batch_size=s.batch_size, lr=s.align_lr,
                                 weight_decay=cfg.train.weight_decay, seed=cfg.seed, progress=progress)
        history = fit(recipe, train, None, settings, inputs.run_dir / STAGES_DIR / "alignment", inputs.fingerprint,
                      train_tokens, resume=cfg.resume, log=log).history
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(cached, lambda tmp: save_file(alignment_weights(vlm), str(tmp),
                                                      metadata={"history": json.dumps(history)}))
    atomic_save(inputs.run_dir / "vlm_alignment.safetensors",
                lambda tmp: save_file(alignment_weights(vlm), str(tmp)))
    return {"history": history, "images": len(train), "classes": len(inputs.base), "from_cache": from_cache,
            "weights": "vlm_alignment.safetensors", "logit_scale": float(vlm.logit_scale.detach().exp())}


@torch.no_grad()
def evaluate(inputs: VLMInputs, recipe: PromptTuning, test_features: torch.Tensor, templates: torch.Tensor,
             scale) -> dict:
    """Accuracy on base and novel test images, each among its own classes; zero-shot beside it."""
    task, vlm = inputs.task, inputs.vlm
    learner = recipe.student
    result = {"prompt_tuned": {}, "zero_shot": {}}
    for split, classes in (("base", inputs.base), ("novel", inputs.novel)):
        rows = torch.isin(task.test.labels, torch.tensor(classes, dtype=torch.long))
        if not classes or not rows.any():
            result["prompt_tuned"][split] = result["zero_shot"][split] = None
            continue
        labels = remap(task.test.labels[rows], classes)
        prompts = learner if classes == inputs.base else learner.for_classes(vlm, [task.class_names[c]
                                                                                    for c in classes])
        text = F.normalize(vlm.encode_text_embeddings(prompts(), prompts.ids, prompts.mask), dim=-1)
        result["prompt_tuned"][split] = ((scale * test_features[rows] @ text.t()).argmax(1) == labels).float().mean().item()
        result["zero_shot"][split] = zero_shot_accuracy(test_features[rows], labels, templates[classes], scale)
    for kind in result.values():
        kind["harmonic_mean"] = harmonic_mean(kind["base"], kind["novel"])
    return result


@torch.no_grad()
def fold(inputs: VLMInputs, recipe: PromptTuning) -> tuple[torch.nn.Module, dict]:
    """The deployable classifier over every class, and its parity with the prompt-tuned model."""
    task, vlm, learner = inputs.task, inputs.vlm, recipe.student
    prompts = learner if not inputs.novel else learner.for_classes(vlm, task.class_names)
    text = vlm.encode_text_embeddings(prompts(), prompts.ids, prompts.mask)
    folded = FoldedPromptClassifier(vlm.image_encoder, vlm.image_projection, text, float(vlm.logit_scale)).eval()
    images = task.test.images[torch.linspace(0, len(task.test) - 1, min(16, len(task.test))).long()]
    reference = vlm.logit_scale.exp() * vlm.image_features(vlm.image_encoder(images))[:, 0] @ F.normalize(text, dim=-1).t()
    diff = float((folded(images) - reference).abs().max())
    if not math.isfinite(diff) or diff > FOLD_TOLERANCE * max(1.0, float(reference.abs().max())):
        raise UserError(f"folded logits differ from the prompt-tuned model's by {diff:.3g}; report this as a bug")
    return folded, {"max_abs_diff": diff, "images": len(images), "classes": len(task.class_names)}
