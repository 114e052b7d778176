"""What every recipe provides to the shared training loop.

A recipe is an `nn.Module` that owns everything it trains (the student plus any
recipe-specific modules), so its `state_dict()` is the whole training state to
checkpoint, and `parameters()` is what the optimizer updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Label of a training image whose label is withheld (the data-scarce setting): it still
# serves distillation as part of the transfer set. Same value as cross_entropy's default
# ignore_index.
UNLABELLED = -100


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows; 0 (still differentiable) when there are none.

    Written without data-dependent control flow or boolean indexing: either would make
    the host wait for the device on every training step.
    """
    per_row = F.cross_entropy(logits, labels, ignore_index=UNLABELLED, reduction="none")  # 0 where unlabelled
    labelled = (labels != UNLABELLED).sum()
    return per_row.sum() / labelled.clamp_min(1)


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    # Frozen-teacher features for these images (N x D), or None for teacher-free recipes.
    teacher_features: torch.Tensor | None = None
    # Multi-task data: the task of each image (int64 N, index into TaskData.tasks); else None.
    task_ids: torch.Tensor | None = None


class Recipe(nn.Module):
    name: str = "base"
    needs_teacher: bool = False
    # True when the loss learns from UNLABELLED images (distillation on a transfer set).
    uses_unlabelled: bool = False
    # True when the recipe routes every image by its task (multi-task data only): the loop
    # passes task ids to loss (Batch.task_ids), evaluation_model and teacher_logits.
    needs_task_ids: bool = False
    # True when the recipe trains part of the foundation model itself (recipe=lora): the
    # builder passes the frozen teacher module, not just its feature width.
    needs_teacher_module: bool = False

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def prepare(self, teacher_features: torch.Tensor | None, labels: torch.Tensor) -> None:
        """One-off work before the first epoch (not repeated on resume)."""

    @classmethod
    def effective_config(cls, cfg: dict, transfer_set: bool) -> dict:
        """A resolved recipe config (a dict, possibly from before a key existed) as this recipe
        trains with it on a training set with (transfer_set) or without images whose labels
        were withheld: configs with equal effective configs train alike. Default: cfg as is."""
        return dict(cfg)

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups (each may set its own "lr"); default: every trainable
        parameter at the configured learning rate."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def feature_extractor(self, teacher: nn.Module) -> nn.Module:
        """What the cached "teacher features" of a Batch are computed by: the frozen teacher's
        pooled features by default; a recipe may cache an intermediate output instead (any
        module with `fingerprint`, `feature_dim` and forward(images) -> N x feature_dim)."""
        return teacher

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss to minimise and its named parts for the training log.

        Per-row terms are means over the batch's rows: under DDP each rank gets an
        equal share of the global batch, so the averaged gradient is the full-batch one
        (exactly for fully labelled batches; batch statistics such as RD's CKA are taken
        per share, like per-GPU BatchNorm statistics). The parts are detached scalar
        tensors on the batch's device, never Python floats: the loop sums them on the
        device and reads them once per epoch (`.item()` here would make the host wait for
        the device every step).
        """
        raise NotImplementedError

    def teacher_logits(self, teacher_features: torch.Tensor,
                       task_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The teacher branch's class logits, for reporting; None if the recipe has none.
        task_ids: given (and needed) only when needs_task_ids."""
        return None

    def evaluation_model(self) -> nn.Module:
        """What accuracy is measured on: logits over the data set's classes (global ids on
        multi-task data), called as model(images), or model(images, task_ids) when
        needs_task_ids."""
        return self.deployable()

    def deployable(self) -> nn.Module:
        """The model that is exported: the student alone."""
        return self.student

    def deployables(self) -> dict[str, nn.Module]:
        """Every model to export, by file stem (a multi-task recipe exports one per task)."""
        return {"model": self.deployable()}
