"""Low-Rank Knowledge Decomposition (Zhou et al., "Low-Rank Knowledge Decomposition for
Medical Foundation Models"): one shared student backbone W0 plus, per task t, a low-rank
expert in its layers, g_t = (W0 + s B_t A_t) h with s = lora_alpha / rank, and one head
per task (toolchain/models/experts.py). Multi-task data only (data=multitask): every image
carries its task id, and a mixed-task batch is routed in one forward pass.

Knowledge comes from the frozen foundation model as in `kd`: `prepare` fits one linear
probe per task on the cached teacher features (task-local classes), whose
temperature-softened logits are the soft labels.

Loss, a sum of per-task terms:

    loss = sum_t [ CE_t + kd_weight * T^2 * KL_t ]
    CE_t = mean over the batch's labelled task-t images of CE(head_t, task-local label)
    KL_t = mean over the batch's task-t images (labelled or not) of KL(probe_t || head_t)

Normalisation: each term is a mean over its own task's images, and the terms are summed,
so every task weighs the same whatever its share of the batch, and a task absent from a
batch adds exactly 0. (The official code weighs CE_t by n_t / N instead, which lets large
tasks dominate small ones.) With per-task BatchNorm statistics (TaskBatchNorm2d) no term
depends on another task's images, so gradient separation is exact: expert t and head t get
the gradient of task t's term alone (exact zeros from the others), and the shared W0 the
sum over tasks. Under DDP each rank takes the per-task means over its own share, like
per-GPU BatchNorm statistics.

Deployment: `deployables()` is {task name: fused model}, each a plain Student (W0 + s B_t A_t
merged, the task's BatchNorm statistics and head) with the backbone's size and latency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medkd.toolchain.errors import ConfigError, UserError
from medkd.toolchain.models.experts import ExpertStudent, mask_to_tasks

from .base import UNLABELLED, Batch, Recipe, labelled_cross_entropy
from .kd import fit_linear_probe

SINGLE_TASK_ERROR = ("recipe=lorkd needs multi-task data (data=multitask): it trains one expert per task and "
                     "routes every image by its task id, and this data set is a single task")


def _number(cfg, key: str, *, minimum: float, inclusive: bool) -> float:
    value = cfg.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ConfigError(f"recipe.{key} must be a number {bound}, got '{value}'")
    return float(value)


class LoRKDRecipe(Recipe):
    name = "lorkd"
    needs_teacher = True
    uses_unlabelled = True
    needs_task_ids = True

    def __init__(self, cfg, student, teacher_dim: int, tasks: Sequence | None = None):
        if not tasks:
            raise ConfigError(SINGLE_TASK_ERROR)
        task_list = list(tasks)
        expert_layers = cfg.get("expert_layers", "all")
        if not isinstance(expert_layers, str):  # an OmegaConf ListConfig of globs
            expert_layers = list(expert_layers)
        model = ExpertStudent(student, [t.num_classes for t in task_list], cfg.get("rank"),
                              cfg.get("lora_alpha"), expert_layers)
        super().__init__(model)
        self.tasks = task_list
        self.kd_weight = _number(cfg, "kd_weight", minimum=0, inclusive=True)
        self.temperature = _number(cfg, "temperature", minimum=0, inclusive=False)
        self.probe_epochs = int(cfg.probe_epochs)
        self.probe_lr = float(cfg.probe_lr)
        # Filled by prepare(); module attributes so checkpoints carry them across a resume.
        self.teacher_heads = nn.ModuleList(
            nn.Linear(teacher_dim, t.num_classes).requires_grad_(False) for t in task_list)

    # ------------------------------------------------------------------ training

    def prepare(self, teacher_features, labels):
        """One probe per task on its labelled images (the global label says the task)."""
        class_task = self.student.class_task.to(labels.device)
        offsets = self.student.offsets.to(labels.device)
        labelled = labels != UNLABELLED
        task_of = torch.where(labelled, class_task[labels.clamp_min(0)], -1)
        for t, head in enumerate(self.teacher_heads):
            mine = task_of == t
            if not bool(mine.any()):
                raise UserError(f"task '{self.tasks[t].name}' has no labelled training image for its teacher probe")
            probe = fit_linear_probe(teacher_features[mine], labels[mine] - offsets[t], head.out_features,
                                     self.probe_epochs, self.probe_lr)
            head.load_state_dict(probe.state_dict())

    def task_terms(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(CE_t, KL_t) for every task t, each a mean over the batch's task-t images."""
        ids = self._task_ids(batch.task_ids)
        student = self.student.task_logits(batch.images, ids)
        with torch.no_grad():
            teacher = torch.cat([head(batch.teacher_features) for head in self.teacher_heads], dim=1)
        temp = self.temperature
        terms = []
        for t, (start, k) in enumerate(zip(self.student.task_offsets, self.student.num_classes)):
            mine = ids == t
            own = slice(start, start + k)
            local = torch.where(mine & (batch.labels != UNLABELLED), batch.labels - start, UNLABELLED)
            ce = labelled_cross_entropy(student[:, own], local)
            kl_rows = F.kl_div(F.log_softmax(student[:, own].float() / temp, dim=1),
                               F.log_softmax(teacher[:, own].float() / temp, dim=1),
                               log_target=True, reduction="none").sum(1)
            kl = (kl_rows * mine).sum() / mine.sum().clamp_min(1) * (temp * temp)
            terms.append((ce, kl))
        return terms

    def loss(self, batch: Batch):
        terms = self.task_terms(batch)
        ce = torch.stack([ce for ce, _ in terms]).sum()
        kl = torch.stack([kl for _, kl in terms]).sum()
        return ce + self.kd_weight * kl, {"ce": ce.detach(), "kl": kl.detach()}

    @staticmethod
    def _task_ids(task_ids):
        if task_ids is None:
            raise UserError(SINGLE_TASK_ERROR)
        return task_ids

    # ------------------------------------------------------------------ evaluation, export

    def teacher_logits(self, teacher_features, task_ids=None):
        """The per-task probes' logits over all classes, -inf outside each image's task."""
        ids = self._task_ids(task_ids)
        logits = torch.cat([head(teacher_features) for head in self.teacher_heads], dim=1)
        return mask_to_tasks(logits, ids, self.student.class_task)

    def evaluation_model(self) -> nn.Module:
        return self.student  # model(images, task_ids) -> global-class logits, task-routed

    def deployable(self) -> nn.Module:
        """The first task's fused model (deployables() has every task's)."""
        return self.student.fuse(0)

    def deployables(self) -> dict[str, nn.Module]:
        """{task name: that task's fused Student}, in task-id order; the models' outputs are
        task-local class ids (TaskInfo.class_names)."""
        return {task.name: self.student.fuse(t) for t, task in enumerate(self.tasks)}
