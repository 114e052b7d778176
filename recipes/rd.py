"""Reprogramming Distillation (Zhou et al., "Reprogramming Distillation for Medical
Foundation Models").

The foundation model stays frozen (its features are precomputed and cached). A small
reprogramming module maps them into the student's feature space, and the student's
own classifier is *shared* by both branches:

    teacher branch:  f_t = R(T(x)),   logits_t = head(f_t)
    student branch:  f_s = S(x),      logits_s = head(f_s)

Co-training optimises R, the head and the student together, so the reprogrammed
teacher space and the student space share one decision boundary; linear CKA between
f_s and f_t (invariant to rotation and scale, hence robust across architectures)
distils the teacher's representation geometry into the student:

    loss = CE(logits_s, y) + teacher_ce_weight * CE(logits_t, y) + cka_weight * (1 - CKA(f_s, f_t))

Unlabelled images (label UNLABELLED, the data-scarce setting) contribute only to the CKA
term. Only the student (with the shared head) is deployed.
"""

from __future__ import annotations

from torch import nn

from medkd.kernels import cka_loss

from .base import Batch, Recipe, labelled_cross_entropy


class ReprogrammingModule(nn.Sequential):
    """Maps frozen-teacher features (teacher_dim) into the student feature space."""

    def __init__(self, teacher_dim: int, hidden: int, student_dim: int):
        super().__init__(
            nn.LayerNorm(teacher_dim),
            nn.Linear(teacher_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, student_dim),
        )


class RDRecipe(Recipe):
    name = "rd"
    needs_teacher = True
    uses_unlabelled = True

    def __init__(self, cfg, student, teacher_dim: int):
        super().__init__(student)
        self.reprogram = ReprogrammingModule(teacher_dim, int(cfg.reprogram_hidden), student.feature_dim)
        self.teacher_ce_weight = float(cfg.teacher_ce_weight)
        self.cka_weight = float(cfg.cka_weight)

    def loss(self, batch: Batch):
        student_features = self.student.features(batch.images)
        teacher_features = self.reprogram(batch.teacher_features)
        ce_student = labelled_cross_entropy(self.student.head(student_features), batch.labels)
        ce_teacher = labelled_cross_entropy(self.student.head(teacher_features), batch.labels)
        cka = cka_loss(student_features, teacher_features)
        total = ce_student + self.teacher_ce_weight * ce_teacher + self.cka_weight * cka
        return total, {"ce": ce_student.detach(), "ce_teacher": ce_teacher.detach(), "cka_loss": cka.detach()}

    def teacher_logits(self, teacher_features, task_ids=None):
        return self.student.head(self.reprogram(teacher_features))
