"""The training loop shared by every recipe: epochs, evaluation, checkpoint, resume.

After every epoch the whole training state (recipe modules, optimizer, LR schedule,
shuffling RNG, history) is checkpointed atomically, so a killed run rerun with
`resume=true` continues from the last finished epoch and ends where an unkilled
run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medkd.recipes import Batch, Recipe

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data.base import ImageSet


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    progress: bool | None = None  # None = tqdm decides (off when not a terminal)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def teacher_branch_accuracy(recipe: Recipe, features: torch.Tensor | None, labels) -> float | None:
    if features is None:
        return None
    was_training = recipe.training
    recipe.eval()
    logits = recipe.teacher_logits(features)
    recipe.train(was_training)
    return None if logits is None else accuracy(logits, labels)


def fit(
    recipe: Recipe,
    train: ImageSet,
    test: ImageSet,
    settings: TrainSettings,
    run_dir: Path,
    config_fingerprint: str,
    train_teacher_features: torch.Tensor | None = None,
    test_teacher_features: torch.Tensor | None = None,
    resume: bool = False,
    log=print,
) -> TrainResult:
    optimizer = torch.optim.AdamW(
        [p for p in recipe.parameters() if p.requires_grad],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    # Cosine decay per step: no schedule state to get wrong on resume beyond the step count.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    shuffle_rng = torch.Generator().manual_seed(settings.seed)
    result = TrainResult()
    start_epoch = 0

    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, config_fingerprint)
        recipe.load_state_dict(state["recipe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle_rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        result.history = list(state["history"])
        start_epoch = result.resumed_from_epoch = int(state["epoch"])
        log(f"resuming from {checkpoint_path} after epoch {start_epoch}/{settings.epochs}")
    else:
        if resume:
            log(f"resume=true but no checkpoint in {run_dir}; starting from epoch 0")
        recipe.prepare(train_teacher_features, train.labels)

    for epoch in range(start_epoch, settings.epochs):
        recipe.train()
        order = torch.randperm(len(train), generator=shuffle_rng)
        running: dict[str, float] = {}
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            unit="batch",
            leave=False,
            disable=False if settings.progress else None if settings.progress is None else True,
        )
        for step in bar:
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            batch = Batch(
                train.images[index],
                train.labels[index],
                None if train_teacher_features is None else train_teacher_features[index],
            )
            loss, parts = recipe.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                running[key] = running.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()

        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in running.items()}}
        record["test_accuracy"] = accuracy(predict(recipe.deployable(), test.images), test.labels)
        teacher_acc = teacher_branch_accuracy(recipe, test_teacher_features, test.labels)
        if teacher_acc is not None:
            record["teacher_test_accuracy"] = teacher_acc
        result.history.append(record)
        log(
            f"epoch {epoch + 1}/{settings.epochs}  loss {record['loss']:.4f}  "
            f"test acc {record['test_accuracy']:.4f}"
            + (f"  teacher-branch acc {teacher_acc:.4f}" if teacher_acc is not None else "")
        )
        save_checkpoint(
            run_dir,
            {
                "config_fingerprint": config_fingerprint,
                "epoch": epoch + 1,
                "recipe": recipe.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "shuffle_rng": shuffle_rng.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": result.history,
            },
        )
    recipe.eval()
    return result
