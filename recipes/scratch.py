"""Baseline: the student trained from scratch on the labels alone."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Batch, Recipe


class ScratchRecipe(Recipe):
    name = "scratch"
    needs_teacher = False

    def __init__(self, cfg, student, teacher_dim: int | None = None):
        super().__init__(student)

    def loss(self, batch: Batch):
        ce = F.cross_entropy(self.student(batch.images), batch.labels)
        return ce, {"ce": ce.item()}
