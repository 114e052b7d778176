"""Plain knowledge distillation (Hinton et al., 2015), the baseline every method must beat.

The frozen foundation model has no head for the downstream task, so `prepare` fits a
linear probe on its cached features (the usual way to make a frozen backbone a
teacher); the student then matches the probe's temperature-softened logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import UNLABELLED, Batch, Recipe, labelled_cross_entropy


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, lr: float
) -> nn.Linear:
    """Full-batch AdamW on standardised features; returns a probe that takes raw features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    probe = nn.Linear(features.shape[1], num_classes).to(features.device)  # initialised on the CPU RNG
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-3)
    normed = (features - mean) / std
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(probe(normed), labels).backward()
        optimizer.step()
    # Fold the standardisation into the probe so callers pass raw features.
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)


class KDRecipe(Recipe):
    name = "kd"
    needs_teacher = True
    uses_unlabelled = True

    def __init__(self, cfg, student, teacher_dim: int):
        super().__init__(student)
        self.temperature = float(cfg.temperature)
        self.alpha = float(cfg.alpha)
        self.probe_epochs = int(cfg.probe_epochs)
        self.probe_lr = float(cfg.probe_lr)
        # Filled by prepare(); a module attribute so checkpoints carry it across a resume.
        self.teacher_head = nn.Linear(teacher_dim, student.head.out_features).requires_grad_(False)

    def prepare(self, teacher_features, labels):
        labelled = labels != UNLABELLED  # the probe can only learn from labelled images
        probe = fit_linear_probe(
            teacher_features[labelled], labels[labelled], self.teacher_head.out_features, self.probe_epochs, self.probe_lr
        )
        self.teacher_head.load_state_dict(probe.state_dict())

    def loss(self, batch: Batch):
        t = self.temperature
        student_logits = self.student(batch.images)
        with torch.no_grad():
            teacher_logits = self.teacher_head(batch.teacher_features)
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        ce = labelled_cross_entropy(student_logits, batch.labels)
        total = self.alpha * kl + (1 - self.alpha) * ce
        return total, {"kl": kl.detach(), "ce": ce.detach()}

    def teacher_logits(self, teacher_features, task_ids=None):
        return self.teacher_head(teacher_features)
