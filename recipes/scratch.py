"""Baseline: the student trained from scratch on the labels alone."""

from __future__ import annotations

from .base import Batch, Recipe, labelled_cross_entropy


class ScratchRecipe(Recipe):
    name = "scratch"
    needs_teacher = False

    def __init__(self, cfg, student, teacher_dim: int | None = None):
        super().__init__(student)

    def loss(self, batch: Batch):
        ce = labelled_cross_entropy(self.student(batch.images), batch.labels)
        return ce, {"ce": ce.detach()}
