"""The training loop shared by every recipe: device, precision, DDP, checkpoint, resume.

After every epoch the whole training state (recipe modules, optimizer, LR schedule, loss
scaler, shuffling RNG, history) is checkpointed atomically, so a killed run rerun with
`resume=true` continues from the last finished epoch and ends where an unkilled run would
have.

The step loop never waits for the device: recipes return their loss parts as detached
tensors, which are summed on the device and read once per epoch (plus one read every
POSTFIX_EVERY steps for the progress bar's running loss), and the fused AdamW keeps its
step counters on the device.

Under torchrun (see distributed.py) every rank draws the same seeded permutation and takes
an equal contiguous share of each global batch of `batch_size` rows, so the averaged
gradients equal a single process's full-batch gradient; rank 0 alone logs and checkpoints.
The test split is not seen here: `val` (optional) is evaluated after every epoch.

Augmentation (`augment`, a data.augment.ViewTable): every epoch each training image is shown
as one of its K fixed views, drawn from the shuffling generator right after the permutation
(so resume, every rank and every recipe see the same views for the same seed); the batch is
rendered on the training device and gets the teacher features of that very view (K x N x D
features, computed on the same pixels). Validation is never augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medkd.kernels._dispatch import backends_run, reset_backends_run
from medkd.recipes import Batch, Recipe

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data.augment import ViewTable
from .data.base import ImageSet
from .device import autocast, batch_to, check_precision, grad_scaler
from .distributed import DistContext, all_reduce_sum, barrier, broadcast_object, sync_buffers
from .errors import UserError
from .progress import ProgressPolicy, as_policy

# The progress bar's running loss costs one device->host read; on a GPU a read per step
# would stall the launch queue every step, one per 50 steps costs well under 1 %.
POSTFIX_EVERY = 50


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int  # the global batch: split over the processes under torchrun
    lr: float
    weight_decay: float
    seed: int
    progress: bool | None | ProgressPolicy = None  # None = bars on a terminal, lines elsewhere
    precision: str = "fp32"  # fp32 | bf16 | fp16 (see device.py)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1
    # Which backend each fused kernel ran on, e.g. {"cka": "triton"}; empty if none ran.
    kernel_backends: dict[str, str] = field(default_factory=dict)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (on the CPU) of `model` for CPU `images`, run wherever the model is; with
    `task_ids`, the model is called as model(images, task_ids) (Recipe.evaluation_model of
    a recipe that needs_task_ids)."""
    device = _model_device(model)
    was_training = model.training
    model.eval()

    def run(i):
        args = [images[i : i + batch_size].to(device)]
        if task_ids is not None:
            args.append(task_ids[i : i + batch_size].to(device))
        return model(*args).float().cpu()

    logits = torch.cat([run(i) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def teacher_branch_accuracy(recipe: Recipe, features: torch.Tensor | None, labels: torch.Tensor,
                            task_ids: torch.Tensor | None = None) -> float | None:
    """Accuracy of the recipe's teacher branch on precomputed teacher features (e.g. the
    test split's, once after training); None without features or a teacher branch (or
    without task ids for a recipe that needs them)."""
    if features is None or (recipe.needs_task_ids and task_ids is None):
        return None
    was_training = recipe.training
    recipe.eval()
    device = _model_device(recipe)
    logits = recipe.teacher_logits(features.to(device), None if task_ids is None else task_ids.to(device))
    recipe.train(was_training)
    return None if logits is None else accuracy(logits.cpu(), labels)


def step_indices(order: torch.Tensor, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's rows of global batch `step` of the permutation `order`.

    The global batch is the slice a single process would take; each rank takes an equal
    contiguous share. A last batch whose size is not a multiple of world_size is padded
    with rows from the start of the permutation (as DistributedSampler pads), so every
    rank averages its loss over the same number of rows and all ranks take the same
    number of steps.
    """
    rows = order[step * batch_size : (step + 1) * batch_size]
    pad = (-len(rows)) % world_size
    if pad:
        rows = torch.cat([rows, order.repeat(math.ceil(pad / len(order)))[:pad]])
    share = len(rows) // world_size
    return rows[rank * share : (rank + 1) * share]


class RecipeLoss(nn.Module):
    """recipe.loss as a forward(), so DistributedDataParallel's hooks see the step."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe

    def forward(self, images, labels, teacher_features, task_ids=None):
        return self.recipe.loss(Batch(images, labels, teacher_features, task_ids))


@torch.no_grad()
def _correct_count(predict_logits, inputs: torch.Tensor, labels: torch.Tensor, ctx: DistContext,
                   batch_size: int = 256, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[correct, total] over every rank's share of (inputs, labels), summed on the device.

    `inputs` may live on the CPU (images, moved per chunk) or on the device (features).
    With `task_ids` (on the device), predict_logits is called with each chunk's task ids too.
    """
    share = torch.arange(len(labels)).tensor_split(ctx.world_size)[ctx.rank]
    counts = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    for chunk in share.split(batch_size):
        args = [batch_to(inputs[chunk.to(inputs.device)], ctx.device)]
        if task_ids is not None:
            args.append(task_ids[chunk.to(task_ids.device)])
        logits = predict_logits(*args)
        counts[0] += (logits.argmax(1) == labels[chunk.to(labels.device)]).sum()
        counts[1] += len(chunk)
    return all_reduce_sum(ctx, counts)


@torch.no_grad()
def _evaluate(recipe: Recipe, val: ImageSet, val_features: torch.Tensor | None, ctx: DistContext) -> dict:
    """val_accuracy, and teacher_val_accuracy for recipes with a teacher branch."""
    was_training = recipe.training
    recipe.eval()
    labels = val.labels.to(ctx.device)
    task_ids = val.task_ids.to(ctx.device) if recipe.needs_task_ids else None
    counts = {"val_accuracy": _correct_count(recipe.evaluation_model(), val.images, labels, ctx, task_ids=task_ids)}
    if val_features is not None and len(val_features) and recipe.teacher_logits(
            val_features[:1], None if task_ids is None else task_ids[:1]) is not None:
        counts["teacher_val_accuracy"] = _correct_count(recipe.teacher_logits, val_features, labels, ctx,
                                                        task_ids=task_ids)
    recipe.train(was_training)
    values = torch.stack(list(counts.values())).tolist()  # the one device read of the evaluation
    return {k: correct / max(total, 1) for k, (correct, total) in zip(counts, values)}


def _resume_state(checkpoint_path: Path, fingerprint: str, ctx: DistContext) -> dict | None:
    """Rank 0 reads and checks the checkpoint; every rank gets the same state (or error),
    also when the other nodes cannot see rank 0's filesystem."""
    state = error = None
    if ctx.is_main and checkpoint_path.exists():
        try:
            state = load_checkpoint(checkpoint_path, fingerprint)
        except UserError as exc:
            error = str(exc)
    state, error = broadcast_object(ctx, (state, error))
    if error:
        raise UserError(error)
    return state


def fit(
    recipe: Recipe,
    train: ImageSet,
    val: ImageSet | None,
    settings: TrainSettings,
    run_dir: Path,
    config_fingerprint: str,
    train_teacher_features: torch.Tensor | None = None,
    val_teacher_features: torch.Tensor | None = None,
    resume: bool = False,
    log=print,
    *,
    device: torch.device | str | None = None,
    dist: DistContext | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    augment: ViewTable | None = None,
) -> TrainResult:
    """Train `recipe` on `train`; `val` (may be None) is evaluated after every epoch.

    `train` may also be a segmentation MaskSet (its masks are the labels; no views, no val).

    device: where to train (default: dist.device, else the CPU); dist: the torchrun
    context from distributed.setup() (default: a single process); on_epoch_end: called
    with each epoch's record (losses, val metrics) once it is checkpointed, on rank 0
    only, like `log` (e.g. TensorBoard scalars); augment: the K views of every training
    image (data/augment.py), with train_teacher_features K x N x D (view 0 = the images
    themselves, which recipe.prepare gets); without it features are N x D and the images are
    shown as they are. The recipe is returned on the CPU, in eval mode, ready for export.
    """
    if dist is None:
        dist = DistContext(device=torch.device(device if device is not None else "cpu"))
    device = torch.device(device) if device is not None else dist.device
    if device.type == "cuda" and device.index is None:  # "cuda" -> "cuda:N", as tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    if device != dist.device:
        dist = DistContext(dist.rank, dist.world_size, dist.local_rank, device)
    check_precision(settings.precision, device)
    if settings.batch_size % dist.world_size:
        raise UserError(f"train.batch_size={settings.batch_size} must be a multiple of the number of "
                        f"processes ({dist.world_size}): it is the global batch, split evenly over them")
    if recipe.needs_task_ids and train.task_ids is None:
        raise UserError(f"recipe={recipe.name} needs multi-task data (data=multitask): every training image "
                        "must carry its task id, and this data set is a single task")
    _check_augment(augment, train, train_teacher_features)
    if not dist.is_main:
        log = _quiet

    recipe.to(device)
    train_labels = train.labels.to(device)
    train_task_ids = None if train.task_ids is None else train.task_ids.to(device)
    train_features = None if train_teacher_features is None else train_teacher_features.to(device)
    views = None if augment is None else augment.to(device)
    val_features = None if val_teacher_features is None or val is None else val_teacher_features.to(device)
    optimizer = torch.optim.AdamW(
        recipe.parameter_groups(settings.lr),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        # Fused: the step counters live on the device (the default keeps them on the host
        # and reads them every step), and GradScaler skips its own per-step read.
        fused=device.type in ("cpu", "cuda"),
    )
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    # Cosine decay per step: no schedule state to get wrong on resume beyond the step count.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    scaler = grad_scaler(settings.precision, device)
    shuffle_rng = torch.Generator().manual_seed(settings.seed)
    result = TrainResult(device=str(device), precision=settings.precision, world_size=dist.world_size)
    start_epoch = 0

    checkpoint_path = run_dir / CHECKPOINT_NAME
    state = _resume_state(checkpoint_path, config_fingerprint, dist) if resume else None
    if state is not None:
        recipe.load_state_dict(state["recipe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        shuffle_rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        result.history = list(state["history"])
        start_epoch = result.resumed_from_epoch = int(state["epoch"])
        log(f"resuming from {checkpoint_path} after epoch {start_epoch}/{settings.epochs}")
    else:
        if resume:
            log(f"resume=true but no checkpoint in {run_dir}; starting from epoch 0")
        # With views, the teacher's features of the images themselves (view 0).
        recipe.prepare(train_features if views is None or train_features is None else train_features[0],
                       train_labels)

    model = RecipeLoss(recipe)
    if dist.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"training on {device}, precision {settings.precision}"
        + (f", {dist.world_size} processes (global batch {settings.batch_size})" if dist.enabled else ""))
    policy = as_policy(settings.progress) if dist.is_main else ProgressPolicy(False)
    show_running_loss = policy.mode is not False  # no device read for a bar nobody sees
    reset_backends_run()

    for epoch in range(start_epoch, settings.epochs):
        recipe.train()
        order = torch.randperm(len(train), generator=shuffle_rng)
        order_on_device = order.to(device)
        # Drawn after the permutation from the same generator: checkpointed with it.
        epoch_views = None if views is None else views.epoch_views(shuffle_rng).to(device)
        sums: dict[str, torch.Tensor] = {}
        bar = policy.bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="batch")
        for step in range(steps_per_epoch):
            index = step_indices(order, step, settings.batch_size, dist.rank, dist.world_size)
            index_on_device = step_indices(order_on_device, step, settings.batch_size, dist.rank, dist.world_size)
            images = batch_to(train.images[index], device)
            rows = index_on_device
            if views is not None:  # each image as its view of the epoch, with that view's features
                rows = (epoch_views[index_on_device], index_on_device)
                images = views.render(images, *rows)
            features = None if train_features is None else train_features[rows]
            with autocast(settings.precision, device):
                loss, parts = model(
                    images,
                    train_labels[index_on_device],
                    features,
                    None if train_task_ids is None else train_task_ids[index_on_device],
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                value = value.float()
                sums[key] = sums[key] + value if key in sums else value
            if epoch == start_epoch and step == 0:
                result.kernel_backends = backends_run()
                for op, backend in result.kernel_backends.items():
                    log(f"{op} backend: {backend}")
            bar.update(1)
            if show_running_loss and (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{sums['loss'].item() / (step + 1):.3f}")
        bar.close()

        keys = sorted(sums)
        totals = all_reduce_sum(dist, torch.stack([sums[k] for k in keys]))
        means = (totals / (steps_per_epoch * dist.world_size)).tolist()  # the epoch's one read
        record = {"epoch": epoch + 1, **dict(zip(keys, means))}
        sync_buffers(dist, recipe)
        if val is not None:
            record.update(_evaluate(recipe, val, val_features, dist))
        result.history.append(record)
        log(
            f"epoch {epoch + 1}/{settings.epochs}  loss {record['loss']:.4f}"
            + (f"  val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else "")
            + (f"  teacher-branch val acc {record['teacher_val_accuracy']:.4f}"
               if "teacher_val_accuracy" in record else "")
        )
        if dist.is_main:
            save_checkpoint(run_dir, _training_state(config_fingerprint, epoch + 1, recipe, optimizer, scheduler,
                                                      scaler, shuffle_rng, device, result.history))
            if on_epoch_end is not None:
                on_epoch_end(record)
    barrier(dist)  # every rank returns once rank 0's last checkpoint is on disk
    recipe.eval()
    recipe.to("cpu")
    return result


def _check_augment(augment: ViewTable | None, train: ImageSet, features: torch.Tensor | None) -> None:
    """Views and teacher features must describe the same images (a caller's bug, not the user's)."""
    if augment is None:
        return
    if augment.num_images != len(train):
        raise ValueError(f"augment has views of {augment.num_images} images, the training set {len(train)}")
    if features is not None and (features.ndim < 3 or tuple(features.shape[:2]) != (augment.views, len(train))):
        raise ValueError(f"with {augment.views} views of {len(train)} images, train_teacher_features must be "
                         f"{augment.views} x {len(train)} x D, got {tuple(features.shape)}")


def _training_state(fingerprint, epoch, recipe, optimizer, scheduler, scaler, shuffle_rng, device, history) -> dict:
    state = {
        "config_fingerprint": fingerprint,
        "epoch": epoch,
        "recipe": recipe.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict(),  # {} unless fp16
        "shuffle_rng": shuffle_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _quiet(line: str) -> None:
    """The log of ranks other than 0: they train in step with rank 0 and say nothing."""
