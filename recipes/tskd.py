"""TS-KD (task-specific knowledge distillation for segmentation): the losses and the three
training stages, each a Recipe the shared training loop (toolchain/train.py) runs.

The method (../shared/seeds/tskd-task-specific-kd-segmentation.txt):

  1. TeacherTuning: the foundation model (LiteMedSAM as a prompt-free K-class segmenter,
     toolchain/models/sam_segmenter.py) fine-tuned with LoRA on the labelled slices:
     segmentation_loss. It runs on the cached output of the frozen early stages.
  2. TransferDistillation: the small student learns on the transfer set (unlabelled slices and
     augmented copies) from that task-specific teacher: its tokens, projected, match the
     teacher's image embedding pooled to the student's grid (feature_loss), and its mask
     logits match the teacher's (mask_kl). The task-agnostic KD baseline is the same stage
     with the UN-tuned encoder's embedding and no mask term (an un-tuned decoder has no
     classes to teach).
  3. SupervisedSegmentation: the student fine-tuned on the labelled slices
     (segmentation_loss); alone, it is the from-scratch baseline.

Batches carry masks as labels (N x H x W class ids: a MaskSet's `labels`) and, for stages 1 and
2, precomputed teacher outputs as `teacher_features` (N x D rows; TransferDistillation's rows
are [pooled embedding | mask logits], `TeacherTargets` says how to split them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Recipe

# Added to both sides of the soft Dice ratio: a class absent from the truth and the
# prediction scores 1, not 0/0.
DICE_SMOOTH = 1e-5


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - mean over foreground classes k >= 1 of (2 sum p_k t_k + s) / (sum p_k + sum t_k + s),
    with p = softmax(logits) over classes and t the one-hot masks, sums over the whole batch."""
    probs = logits.float().softmax(dim=1)
    truth = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)[1:]
    total = probs.sum(dims)[1:] + truth.sum(dims)[1:]
    return 1 - ((2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, ce_weight: float = 1.0,
                      dice_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * pixel cross-entropy + dice_weight * soft Dice loss; and the parts."""
    ce = F.cross_entropy(logits.float(), masks)
    dice = soft_dice_loss(logits, masks)
    return ce_weight * ce + dice_weight * dice, {"ce": ce.detach(), "dice_loss": dice.detach()}


def feature_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between projected student tokens and teacher tokens (N x T x D each)."""
    return (projected.float() - teacher.float()).pow(2).mean()


def mask_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes, averaged
    over pixels and images."""
    t = temperature
    teacher_log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    student_log_p = F.log_softmax(student_logits.float() / t, dim=1)
    per_pixel = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1)
    return t * t * per_pixel.mean()


class SupervisedSegmentation(Recipe):
    """Stage 3 (and the scratch baseline): the student on labelled masks, CE + Dice."""

    name = "seg-supervised"

    def __init__(self, student: nn.Module, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__(student)
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def loss(self, batch: Batch):
        return segmentation_loss(self.student(batch.images), batch.labels, self.ce_weight, self.dice_weight)


class TeacherTuning(Recipe):
    """Stage 1: the LoRA-adapted foundation segmenter on cached early-stage tokens, CE + Dice."""

    name = "seg-teacher-tuning"
    needs_teacher = True

    def __init__(self, segmenter: nn.Module, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__(segmenter)
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def loss(self, batch: Batch):
        logits = self.student.from_intermediate(batch.teacher_features)
        return segmentation_loss(logits, batch.labels, self.ce_weight, self.dice_weight)


@dataclass(frozen=True)
class TeacherTargets:
    """Layout of a TransferDistillation feature row: the teacher embedding pooled to the
    student's grid (channels x grid x grid), then, when `num_classes`, its mask logits
    (num_classes x size x size)."""

    channels: int
    grid: int
    num_classes: int = 0
    size: int = 0

    @property
    def embedding_width(self) -> int:
        return self.channels * self.grid * self.grid

    @property
    def width(self) -> int:
        return self.embedding_width + self.num_classes * self.size * self.size

    def pack(self, embedding: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Rows N x width from the teacher's embedding N x C x g' x g' (pooled here to the
        student's grid) and mask logits N x K x size x size (or None)."""
        pooled = F.adaptive_avg_pool2d(embedding.float(), self.grid).flatten(1)
        return pooled if logits is None else torch.cat([pooled, logits.float().flatten(1)], dim=1)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher tokens N x grid^2 x channels, mask logits N x K x size x size or None)."""
        n = rows.shape[0]
        tokens = rows[:, : self.embedding_width].reshape(n, self.channels, self.grid * self.grid).transpose(1, 2)
        if not self.num_classes:
            return tokens, None
        return tokens, rows[:, self.embedding_width:].reshape(n, self.num_classes, self.size, self.size)


class TransferDistillation(Recipe):
    """Stage 2: student tokens -> linear projection -> teacher tokens (feature_loss), and, with
    teacher mask logits in the targets, mask_kl at `temperature`. Learns from every image;
    labels are not used."""

    name = "seg-transfer-distillation"
    needs_teacher = True
    uses_unlabelled = True

    def __init__(self, student: nn.Module, targets: TeacherTargets, feature_weight: float = 1.0,
                 logit_weight: float = 1.0, temperature: float = 2.0):
        super().__init__(student)
        self.targets = targets
        # Trained with the student, not deployed: maps its token width to the teacher's.
        self.projection = nn.Linear(student.embed_dim, targets.channels)
        self.feature_weight, self.logit_weight, self.temperature = feature_weight, logit_weight, temperature

    def loss(self, batch: Batch):
        teacher_tokens, teacher_logits = self.targets.split(batch.teacher_features)
        tokens = self.student.tokens(batch.images)
        features = feature_loss(self.projection(tokens), teacher_tokens)
        total, parts = self.feature_weight * features, {"feature_loss": features.detach()}
        if teacher_logits is not None and self.logit_weight:
            kl = mask_kl(self.student.decode(tokens), teacher_logits, self.temperature)
            total = total + self.logit_weight * kl
            parts["mask_kl"] = kl.detach()
        return total, parts
