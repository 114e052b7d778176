"""Reprogramming Distillation (Zhou et al., "Reprogramming Distillation for Medical
Foundation Models", MICCAI 2024).

The foundation model stays frozen (its features are precomputed and cached). A small
reprogramming module R maps them into the student's feature space, and the student's
own classifier is *shared* by both branches:

    teacher branch:  f_t = R(T(x)),   logits_t = head(f_t)
    student branch:  f_s = S(x),      logits_s = head(f_s)

Co-training optimises R, the head and the student together, so the reprogrammed
teacher space and the student space share one decision boundary; linear CKA between
f_s and f_t (invariant to rotation and scale, hence robust across architectures)
distils the teacher's representation geometry into the student. The loss, each term a
mean over the batch's rows (CE over its labelled rows only):

    loss = CE(logits_s, y)                                                  labelled rows
         + teacher_ce_weight * CE(logits_t, y)                              labelled rows
         + cka_weight * (1 - CKA(f_s, f_t*))                                every row
         + logit_weight * T^2 * KL(softmax(logits_t*/T) || softmax(logits_s/T))   every row

    f_t* = f_t.detach() with cka_detach_teacher=true, else f_t
    logits_t* = logits_t.detach() (always), T = logit_temperature
    the logit term only when the training set holds images with withheld labels (a transfer
    set) with logit_when=transfer_set; on every training set with logit_when=always

Gradient flow, and why:
- CKA: without the detach, the CKA gradient also reaches R and moves the reprogrammed
  teacher towards the student, which lowers the term without teaching the student
  anything; `cka_detach_teacher=true` makes it a one-way target (R then learns only from
  the co-training CE). false is the behaviour before the switch existed.
- The logit term's teacher side is always detached: the student learns from the teacher
  branch, never the reverse (that would pull R and the head towards the student's
  mistakes on unlabelled rows, where no label anchors them). Its student side reaches the
  student and the shared head. Unlike the two CE terms it also covers unlabelled rows, so
  a transfer set carries class knowledge in rd as it does in kd.
- `shared_head=false` (an ablation, not the method) gives the teacher branch its own head.
- `parameter_groups`: R trains at reprogram_lr_scale x the configured learning rate, the
  shared head at head_lr_scale x, the student's backbone at 1x.

Unlabelled images (label UNLABELLED, the data-scarce setting) contribute to the CKA and
logit terms only. Only the student (with the shared head) is deployed.

Where medkd departs from the paper, and why. Sources: the paper's abstract and figure
captions (shared/seeds/rd-reprogramming-distillation.txt); no code of the paper is public.
1. Reprogramming works on the frozen model's cached, pooled output features. The paper
   reprograms the foundation model itself (its Fig. 1: "only the foundation model is
   fixed"), as we read it on the input side of the frozen network (model reprogramming:
   a trained transformation of what the frozen model sees). Here the teacher runs once per image
   and is never in the training loop: input-side reprogramming would need a teacher
   forward and backward pass on every step instead of one cached forward per image, and
   the teacher in every checkpoint.
2. R is a LayerNorm-Linear-GELU-Linear MLP (`reprogram_hidden` wide); the paper's module
   architecture is not reproduced.
3. CKA is taken between pooled N x D features over the images of each batch (per process
   under DDP, like BatchNorm statistics); the text available here does not say whether the
   paper aligns pooled or spatial features.
4. The transfer set: with withheld labels, unlabelled images still enter the CKA (and the
   logit) term; the paper's data-scarce setting, as described, trains on the labelled
   subset.
5. The logit term (`logit_weight`, default 1; 0 = off) is not in the paper's loss; the
   paper's follow-up (DRD) adds such a KD term. By default (`logit_when=transfer_set`) it
   is on only when some training labels were withheld: there it beat the paper's loss on
   validation, with every label it did not (recipe/rd.yaml). The CKA detach is a medkd
   switch: the text available here does not say whether the paper's CKA reaches R.
6. One AdamW with a per-step cosine schedule (toolchain/train.py) for every recipe, with
   the per-module scales above; the paper's optimiser, schedule and loss weights
   (teacher_ce_weight, cka_weight) are not reproduced.
7. The teacher runs once per training image, cached (once per fixed view where data
   augmentation is on), resized to its own input size: it never sees a transformation
   drawn afresh at each step.
bench/rd_defaults.py measures the switches on a validation split carved from the training
side, which is where their defaults (recipe/rd.yaml) are chosen. A config without a switch
(written before it existed) means the paper's value: SWITCH_DEFAULTS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medkd.kernels import cka_loss
from medkd.toolchain.errors import ConfigError

from .base import UNLABELLED, Batch, Recipe, labelled_cross_entropy


class ReprogrammingModule(nn.Sequential):
    """Maps frozen-teacher features (teacher_dim) into the student feature space."""

    def __init__(self, teacher_dim: int, hidden: int, student_dim: int):
        super().__init__(
            nn.LayerNorm(teacher_dim),
            nn.Linear(teacher_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, student_dim),
        )


# The value a config without the key means: the behaviour from before the key existed,
# so older run configs and hand-written test configs keep working unchanged.
SWITCH_DEFAULTS = {
    "cka_detach_teacher": False,
    "logit_weight": 0.0,
    "logit_when": "always",
    "logit_temperature": 4.0,
    "reprogram_lr_scale": 1.0,
    "head_lr_scale": 1.0,
    "shared_head": True,
}


def _setting(cfg, key: str, *, positive: bool = False) -> float:
    """A finite number >= 0 (> 0 with positive) from recipe.KEY, else a one-line ConfigError."""
    value = cfg.get(key, SWITCH_DEFAULTS.get(key))
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise ConfigError(f"recipe.{key} must be a number {'> 0' if positive else '>= 0'}, got '{value}'")
    return float(value)


def _flag(cfg, key: str) -> bool:
    value = cfg.get(key, SWITCH_DEFAULTS[key])
    if not isinstance(value, bool):
        raise ConfigError(f"recipe.{key} must be true or false, got '{value}'")
    return value


# When the logit term is on: only while the training set holds images whose labels were
# withheld (the transfer set), or on every training set.
LOGIT_WHEN = ("transfer_set", "always")


def logit_term_on(logit_when: str, transfer_set: bool) -> bool:
    return logit_when == "always" or transfer_set


def _choice(cfg, key: str, options: tuple[str, ...]) -> str:
    value = cfg.get(key, SWITCH_DEFAULTS[key])
    if value not in options:
        raise ConfigError(f"recipe.{key} must be one of {', '.join(options)}, got '{value}'")
    return value


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over rows (Hinton et al.)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  log_target=True, reduction="batchmean")
    return kl * (t * t)


class RDRecipe(Recipe):
    name = "rd"
    needs_teacher = True
    uses_unlabelled = True

    def __init__(self, cfg, student, teacher_dim: int):
        super().__init__(student)
        hidden = cfg.get("reprogram_hidden")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ConfigError(f"recipe.reprogram_hidden must be a positive integer, got '{hidden}'")
        self.reprogram = ReprogrammingModule(teacher_dim, hidden, student.feature_dim)
        self.teacher_ce_weight = _setting(cfg, "teacher_ce_weight")
        self.cka_weight = _setting(cfg, "cka_weight")
        self.cka_detach_teacher = _flag(cfg, "cka_detach_teacher")
        self.logit_weight = _setting(cfg, "logit_weight")
        self.logit_when = _choice(cfg, "logit_when", LOGIT_WHEN)
        # Decided by prepare() from the training set; kept in checkpoints (extra state).
        self.logit_active = self.logit_when == "always"
        self.logit_temperature = _setting(cfg, "logit_temperature", positive=True)
        self.reprogram_lr_scale = _setting(cfg, "reprogram_lr_scale", positive=True)
        self.head_lr_scale = _setting(cfg, "head_lr_scale", positive=True)
        # Ablation switch: false gives the teacher branch a head of its own, so the two
        # branches no longer share a decision boundary (co-training without the shared head).
        self.teacher_head = None if _flag(cfg, "shared_head") else nn.Linear(
            student.feature_dim, student.head.out_features)

    @classmethod
    def effective_config(cls, cfg: dict, transfer_set: bool) -> dict:
        """Missing switches take their pre-switch values; logit_when is applied (and dropped)."""
        cfg = {**SWITCH_DEFAULTS, **cfg}
        if not logit_term_on(cfg.pop("logit_when"), transfer_set):
            cfg["logit_weight"] = 0.0
        return cfg

    def prepare(self, teacher_features, labels: torch.Tensor) -> None:
        self.logit_active = logit_term_on(self.logit_when, bool((labels == UNLABELLED).any()))

    def get_extra_state(self) -> dict:
        return {"logit_active": self.logit_active}

    def set_extra_state(self, state: dict) -> None:
        self.logit_active = bool(state["logit_active"])

    def _teacher_head(self) -> nn.Module:
        return self.student.head if self.teacher_head is None else self.teacher_head

    def parameter_groups(self, lr: float) -> list[dict]:
        """R, the shared head and the student's backbone, each at its own learning rate."""
        reprogram = list(self.reprogram.parameters())
        head = list(self.student.head.parameters())
        if self.teacher_head is not None:
            head += list(self.teacher_head.parameters())
        taken = {id(p) for p in reprogram + head}
        backbone = [p for p in self.student.parameters() if id(p) not in taken]
        groups = [(reprogram, lr * self.reprogram_lr_scale), (head, lr * self.head_lr_scale), (backbone, lr)]
        return [{"params": [p for p in params if p.requires_grad], "lr": group_lr} for params, group_lr in groups
                if any(p.requires_grad for p in params)]

    def loss(self, batch: Batch):
        student_features = self.student.features(batch.images)
        teacher_features = self.reprogram(batch.teacher_features)
        student_logits = self.student.head(student_features)
        teacher_logits = self._teacher_head()(teacher_features)
        ce_student = labelled_cross_entropy(student_logits, batch.labels)
        ce_teacher = labelled_cross_entropy(teacher_logits, batch.labels)
        cka_target = teacher_features.detach() if self.cka_detach_teacher else teacher_features
        cka = cka_loss(student_features, cka_target)
        total = ce_student + self.teacher_ce_weight * ce_teacher + self.cka_weight * cka
        parts = {"ce": ce_student.detach(), "ce_teacher": ce_teacher.detach(), "cka_loss": cka.detach()}
        if self.logit_weight > 0 and self.logit_active:  # off: not computed, so the log keeps the old parts
            kl = softened_kl(student_logits, teacher_logits.detach(), self.logit_temperature)
            total = total + self.logit_weight * kl
            parts["kl"] = kl.detach()
        return total, parts

    def teacher_logits(self, teacher_features, task_ids=None):
        return self._teacher_head()(self.reprogram(teacher_features))
