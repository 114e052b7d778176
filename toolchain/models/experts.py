"""Task experts for LoRKD: one shared student, a low-rank expert per task in its layers.

    g_t = (W0 + s * B_t A_t) h          s = lora_alpha / rank, t = the sample's task

`ExpertStudent(student, num_classes, rank, lora_alpha, expert_layers)` turns a built
`Student` (students.py) into a multi-task student; it takes over (and modifies in place) the
student's backbone:

* the chosen Conv2d / Linear layers of its backbone become expert layers (below); W0 and
  the bias stay shared and trainable, every task gets A_t, B_t (PEFT's init: A
  kaiming-uniform, B = 0, so a fresh expert model computes exactly the student);
* every BatchNorm2d becomes a TaskBatchNorm2d (per-task statistics, see there);
* the head becomes one Linear per task (`heads[t]`, task-local classes), initialised
  from the student's head rows of that task's classes.

One forward pass serves a mixed-task batch: `model(images, task_ids)`. The task ids reach
the layers through a TaskRouter (timm's forward cannot pass extra arguments down). Expert
layers are called as `layer(x)` inside the student, or `layer(x, task_ids)` directly.

Which layers (`recipe.expert_layers`):
  all             (default) every plain Conv2d and Linear of the backbone, as in the paper
                  and the official code (which puts experts on every convolution);
  1x1-and-linear  only Linear and 1x1 convolutions: the layers the fused Triton kernel runs;
  a glob          over module names inside the backbone, e.g. 'layer4.*' (resnet18) or
                  'blocks.*.mlp.*' (vit_tiny); a list of globs selects their union.
Grouped/depthwise convolutions never get experts: a depthwise weight has k*k entries per
channel, so a rank-r update is no low-rank decomposition (the official code skips them too).
Subclasses of Conv2d/Linear (timm's Conv2dSame, MultiheadAttention's out_proj, ...) are
skipped: their forward or their users do not go through nn.Conv2d/nn.Linear's forward.

How the mixed batch is routed, exactly (no sample ever sees another task's expert):
  * Linear (any leading dims; a ViT's tokens take their image's task) and 1x1 convolutions
    (pixels as rows): `lowrank_expert_linear`, the fused Triton kernel on CUDA, the PyTorch
    reference on CPU.
  * k x k convolutions ("efficient knowledge separation convolution"): one dense conv with
    W0, one conv with every expert's A stacked (T*r output channels, the layer's own
    stride/padding/dilation), then each sample keeps its task's r channels (gather) and
    one batched matmul applies its B_t (a 1x1 conv per sample). The A conv costs T*r/out
    of the dense one (19 % at T=3, r=4, 64 channels; 5 % at 256); the official code's
    grouped conv instead builds a full per-sample weight (N x out x in x k x k).
    Measured on this 2-core CPU (1 thread, batch 64 at 32 px, 3 tasks, all layers): a
    training step takes 1.22x kd's on resnet18 and 1.47x on mobilenetv3 (whose many
    1x1 layers run the reference path on CPU).
  Both give expert t gradients from task-t samples only (exact zeros from the others).

Rank limit: a layer's update B_t A_t is an out x (in*kh*kw) matrix, so rank must be in
1 .. min(out, in*kh*kw) (min(out, in) for Linear and 1x1); otherwise a one-line ConfigError.

Fusion: `fuse(task)` returns a plain `Student` (nn.Conv2d/nn.Linear with W0 + s B_t A_t,
nn.BatchNorm2d with the task's statistics, the task's head) that computes exactly what the
expert model computes for that task: the deployable has the student's size and latency.
The merge is PEFT's (`merge_and_unload`): conv delta[o, i, :, :] = sum_j B[o, j] A[j, i, :, :].
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from medkd.kernels import LowRankExpertLinear, lowrank_expert_linear

from ..errors import ConfigError
from .students import Student

EXPERT_LAYER_CHOICES = ("all", "1x1-and-linear")


class TaskRouter:
    """The task id of every sample of the batch being computed, for the layers that need it."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None

    @contextmanager
    def route(self, task_ids: torch.Tensor) -> Iterator[None]:
        previous, self.task_ids = self.task_ids, task_ids
        try:
            yield
        finally:
            self.task_ids = previous

    def ids(self, given: torch.Tensor | None) -> torch.Tensor:
        ids = given if given is not None else self.task_ids
        if ids is None:
            raise RuntimeError("expert layer called without task ids: call the ExpertStudent as "
                               "model(images, task_ids), or the layer as layer(x, task_ids)")
        return ids


def _router_ids(layer: nn.Module, given: torch.Tensor | None) -> torch.Tensor:
    router = getattr(layer, "router", None)
    if router is None:
        if given is None:
            raise RuntimeError(f"{type(layer).__name__} needs task ids: layer(x, task_ids)")
        return given
    return router.ids(given)


# --------------------------------------------------------------------------- expert layers


class ExpertLinear(LowRankExpertLinear):
    """nn.Linear with one low-rank expert per task; W0 shared (trainable by default here)."""

    router: TaskRouter | None = None

    def forward(self, x, task_ids=None, backend="auto"):
        return super().forward(x, _router_ids(self, task_ids), backend=backend)


class ExpertConv2d(nn.Module):
    """nn.Conv2d (groups=1) with one low-rank expert per task, PEFT's conv LoRA layout:
    A_t is an (r, in, kh, kw) conv with the layer's stride/padding/dilation, B_t an
    (out, r) 1x1 conv. 1x1 convolutions without padding run as the fused expert linear."""

    router: TaskRouter | None = None

    def __init__(self, conv: nn.Conv2d, num_tasks: int, rank: int, scale: float):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("ExpertConv2d needs groups=1 and zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.num_tasks, self.rank, self.scale = num_tasks, rank, float(scale)
        self.weight = conv.weight
        self.bias = conv.bias
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_tasks, rank, self.in_channels, *self.kernel_size, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_tasks, self.out_channels, rank, **kw))
        with torch.no_grad():
            for t in range(num_tasks):  # as PEFT's lora_A conv: fan_in = in * kh * kw
                nn.init.kaiming_uniform_(self.lora_A[t], a=math.sqrt(5))

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding in ((0, 0), "valid")

    def forward(self, x, task_ids=None, backend="auto"):
        ids = _router_ids(self, task_ids)
        if self.pointwise:
            if self.stride != (1, 1):  # a strided 1x1 conv reads every stride-th pixel
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            y = lowrank_expert_linear(x.permute(0, 2, 3, 1), ids, self.weight.flatten(1), self.bias,
                                      self.lora_A.flatten(2), self.lora_B, self.scale, backend=backend)
            return y.permute(0, 3, 1, 2)
        base = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        n, T, r = x.shape[0], self.num_tasks, self.rank
        low = F.conv2d(x, self.lora_A.flatten(0, 1), None, self.stride, self.padding, self.dilation)
        h, w = low.shape[-2:]
        ids = ids.to(torch.int64)
        own = torch.gather(low.reshape(n, T, r, h * w), 1, ids.view(n, 1, 1, 1).expand(n, 1, r, h * w))
        delta = torch.bmm(self.lora_B[ids], own.squeeze(1))  # (n, out, h*w): B_t of each sample
        return base + self.scale * delta.view(n, self.out_channels, h, w)

    @torch.no_grad()
    def delta(self, task: int) -> torch.Tensor:
        """s * B_t A_t as a conv weight (out, in, kh, kw), computed in fp32."""
        a = self.lora_A[task].float().flatten(1)
        return (self.scale * (self.lora_B[task].float() @ a)).view(self.weight.shape)

    @torch.no_grad()
    def fuse(self, task: int) -> nn.Conv2d:
        """nn.Conv2d with W0 + s * B_t A_t."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        conv.weight.copy_((self.weight.float() + self.delta(task)).to(self.weight.dtype))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, num_tasks={self.num_tasks}, "
                f"rank={self.rank}, scale={self.scale}")


class TaskBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics are per task: the normalisation LoRKD needs.

    Why per-task statistics and not plain BatchNorm: batch statistics over a mixed batch
    make every sample's output depend on the other tasks' samples, so task s's loss would
    reach expert t through the mean and variance, and expert gradients would not be
    separated. Why not frozen (eval-mode) BatchNorm: the students are trained from scratch
    (pretrained=False), so there are no trained statistics to freeze, and tasks of
    different modalities (MRI, CT, photographs) have different statistics anyway.

    Training: each sample is normalised with the mean and variance of its own task's
    samples in the batch (one-hot sums, no host sync), and each task keeps its own running
    statistics (T x C), updated only from batches that contain it. Eval: the running
    statistics of the sample's task. The affine weight and bias stay shared, part of W0.
    `fuse(t)` gives the original BatchNorm2d (or timm's BatchNormAct2d, with its act and
    drop) holding task t's statistics.
    """

    router: TaskRouter | None = None

    def __init__(self, bn: nn.BatchNorm2d, num_tasks: int):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.num_tasks = num_tasks
        self.weight, self.bias = bn.weight, bn.bias
        self.track_running_stats = bn.track_running_stats and bn.running_mean is not None
        if self.track_running_stats:
            self.register_buffer("running_mean", bn.running_mean.detach().repeat(num_tasks, 1))
            self.register_buffer("running_var", bn.running_var.detach().repeat(num_tasks, 1))
            self.register_buffer("num_batches_tracked", torch.zeros(num_tasks, dtype=torch.long,
                                                                    device=bn.running_mean.device))
        # timm's BatchNormAct2d applies drop and an activation after normalising.
        self.drop = getattr(bn, "drop", None) if isinstance(getattr(bn, "drop", None), nn.Module) else None
        self.act = getattr(bn, "act", None) if isinstance(getattr(bn, "act", None), nn.Module) else None
        # The module to hand back from fuse(), kept outside the module tree (no duplicate
        # state in state_dict); fuse() copies it and loads this layer's values into it.
        self._template = (copy.deepcopy(bn).cpu(),)

    def forward(self, x, task_ids=None):
        ids = _router_ids(self, task_ids).to(torch.int64)
        x32 = x.float()
        if self.training or not self.track_running_stats:
            # (N, T) one-hot by comparison: F.one_hot would check the ids' range on the host.
            onehot = (ids[:, None] == torch.arange(self.num_tasks, device=ids.device)).to(torch.float32)
            count = onehot.sum(0) * (x.shape[2] * x.shape[3])  # values per channel per task
            denom = count.clamp_min(1)[:, None]
            mean = onehot.t() @ x32.sum((2, 3)) / denom  # (T, C); other tasks' rows add exact zeros
            centred = x32 - mean[ids][:, :, None, None]
            var = onehot.t() @ centred.square().sum((2, 3)) / denom  # biased, as BatchNorm normalises
            if self.training and self.track_running_stats:
                self._update_running(mean, var, count)
        else:
            mean, var = self.running_mean, self.running_var
            centred = x32 - mean[ids][:, :, None, None]
        y = centred * torch.rsqrt(var[ids] + self.eps)[:, :, None, None]
        if self.weight is not None:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        y = y.to(x.dtype)
        if self.drop is not None:
            y = self.drop(y)
        if self.act is not None:
            y = self.act(y)
        return y

    @torch.no_grad()
    def _update_running(self, mean, var, count):
        present = count > 0
        self.num_batches_tracked.add_(present.long())
        if self.momentum is None:  # cumulative average, per task
            factor = (1.0 / self.num_batches_tracked.clamp_min(1).float())[:, None]
        else:
            factor = torch.full_like(mean[:, :1], float(self.momentum))
        factor = torch.where(present[:, None], factor, torch.zeros_like(factor))
        unbiased = var * (count / (count - 1).clamp_min(1))[:, None]
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor.to(self.running_mean.dtype))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor.to(self.running_var.dtype))

    @torch.no_grad()
    def fuse(self, task: int) -> nn.Module:
        bn = copy.deepcopy(self._template[0])
        device = (self.weight if self.weight is not None else self.running_mean).device
        bn.to(device)
        if self.weight is not None:
            bn.weight.copy_(self.weight)
            bn.bias.copy_(self.bias)
        if self.track_running_stats:
            bn.running_mean.copy_(self.running_mean[task])
            bn.running_var.copy_(self.running_var[task])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[task])
        return bn

    def extra_repr(self):
        return f"{self.num_features}, num_tasks={self.num_tasks}, eps={self.eps}, momentum={self.momentum}"


# --------------------------------------------------------------------------- choosing layers


def _eligible(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"


def _is_pointwise_or_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or module.kernel_size == (1, 1)


def _max_rank(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    kh, kw = module.kernel_size
    return min(module.out_channels, module.in_channels * kh * kw)


def select_expert_layers(backbone: nn.Module, spec) -> list[str]:
    """Names (inside `backbone`) of the layers that get experts under `recipe.expert_layers`."""
    eligible = {name: m for name, m in backbone.named_modules() if name and _eligible(m)}
    if isinstance(spec, str) and spec == "all":
        chosen = list(eligible)
    elif isinstance(spec, str) and spec == "1x1-and-linear":
        chosen = [name for name, m in eligible.items() if _is_pointwise_or_linear(m)]
    else:
        globs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
        if not globs or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(f"recipe.expert_layers must be {' | '.join(EXPERT_LAYER_CHOICES)} or a glob over "
                              f"layer names (or a list of globs), got '{spec}'")
        chosen = [name for name in eligible if any(fnmatch.fnmatchcase(name, g) for g in globs)]
    if not chosen:
        shown = ", ".join(list(eligible)[:6]) + (", ..." if len(eligible) > 6 else "")
        raise ConfigError(f"recipe.expert_layers='{spec}' selects no Conv2d/Linear layer of this student "
                          f"(layers: {shown or 'none'})")
    return chosen


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _check_settings(rank, lora_alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"recipe.rank must be a positive integer, got '{rank}'")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ConfigError(f"recipe.lora_alpha must be a positive number, got '{lora_alpha}'")


# --------------------------------------------------------------------------- the student


class ExpertStudent(nn.Module):
    """A Student's backbone with task experts and per-task BatchNorm, plus one head per task.

    `forward(images, task_ids)` returns logits over every task's classes laid end to end
    (the data set's global class ids), -inf outside the sample's own task, so argmax is the
    task-routed prediction. `task_logits` gives every head's logits unmasked (the loss).
    """

    def __init__(self, student: Student, num_classes: Sequence[int], rank: int, lora_alpha: float,
                 expert_layers="all"):
        super().__init__()
        _check_settings(rank, lora_alpha)
        num_classes = [int(k) for k in num_classes]
        if not num_classes or min(num_classes) < 1:
            raise ValueError(f"num_classes must list each task's class count, got {num_classes}")
        self.num_tasks = len(num_classes)
        self.rank, self.lora_alpha, self.scale = rank, float(lora_alpha), float(lora_alpha) / rank
        self.router = TaskRouter()
        self.meta = {"name": student.name, "arch": student.arch, "feature_dim": student.feature_dim,
                     "in_chans": student.in_chans, "image_size": student.image_size,
                     "patch_size": getattr(student, "patch_size", None)}
        backbone = student.backbone
        self.expert_layers = select_expert_layers(backbone, expert_layers)
        for name in self.expert_layers:
            layer = backbone.get_submodule(name)
            if rank > _max_rank(layer):
                raise ConfigError(f"recipe.rank={rank} is too large for layer '{name}' ({layer}): its rank is at most "
                                  f"{_max_rank(layer)}; lower recipe.rank or leave the layer out with recipe.expert_layers")
        for name in self.expert_layers:
            _set_submodule(backbone, name, self._expert(backbone.get_submodule(name)))
        for name, module in list(backbone.named_modules()):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not isinstance(module, nn.BatchNorm2d) or isinstance(module, nn.SyncBatchNorm):
                    raise ConfigError(f"LoRKD cannot separate tasks in '{name}' ({type(module).__name__}): "
                                      "only BatchNorm2d gets per-task statistics")
                bn = TaskBatchNorm2d(module, self.num_tasks)
                bn.router = self.router
                _set_submodule(backbone, name, bn)
        self.backbone = backbone
        self.heads = nn.ModuleList(self._heads(student.head, num_classes))
        # Where each task's classes start among all tasks' classes (the data's global ids),
        # as Python ints (slicing with them needs no device read) and as a buffer.
        self.task_offsets = [sum(num_classes[:t]) for t in range(self.num_tasks)]
        self.register_buffer("offsets", torch.tensor(self.task_offsets), persistent=False)
        self.register_buffer("class_task", torch.repeat_interleave(torch.arange(self.num_tasks),
                                                                   torch.tensor(num_classes)), persistent=False)

    def _expert(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Linear):
            expert = ExpertLinear.from_linear(layer, self.num_tasks, self.rank, self.scale, freeze_base=False)
        else:
            expert = ExpertConv2d(layer, self.num_tasks, self.rank, self.scale)
        expert.router = self.router
        return expert

    def _heads(self, head: nn.Linear, num_classes: list[int]) -> list[nn.Linear]:
        """Task t's head starts as the student head's rows of task t's (global) classes."""
        heads, start = [], 0
        for k in num_classes:
            task_head = nn.Linear(head.in_features, k, bias=head.bias is not None,
                                  device=head.weight.device, dtype=head.weight.dtype)
            if head.out_features == sum(num_classes):
                with torch.no_grad():
                    task_head.weight.copy_(head.weight[start : start + k])
                    if head.bias is not None:
                        task_head.bias.copy_(head.bias[start : start + k])
            heads.append(task_head)
            start += k
        return heads

    @property
    def num_classes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    def features(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        with self.router.route(task_ids):
            return self.backbone(images)

    def task_logits(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Every head's logits for every sample, heads side by side (N x sum K_t)."""
        features = self.features(images, task_ids)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return mask_to_tasks(self.task_logits(images, task_ids), task_ids, self.class_task)

    def modules_with_experts(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.backbone.named_modules():
            if isinstance(module, (ExpertLinear, ExpertConv2d)):
                yield name, module

    @torch.no_grad()
    def fuse(self, task: int) -> Student:
        """Task `task`'s deployable: a plain Student with every expert merged into W0."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        backbone = copy.deepcopy(self.backbone)
        for name, module in list(backbone.named_modules()):
            if isinstance(module, (ExpertLinear, ExpertConv2d, TaskBatchNorm2d)):
                _set_submodule(backbone, name, module.fuse(task))
        meta = self.meta
        with torch.device("meta"):  # its fresh head is replaced below: draw no random numbers
            student = Student(meta["name"], meta["arch"], backbone, meta["feature_dim"],
                              self.heads[task].out_features, meta["in_chans"], meta["image_size"])
        student.head = copy.deepcopy(self.heads[task])
        if meta["patch_size"] is not None:
            student.patch_size = meta["patch_size"]
        return student.to(self.heads[task].weight.device).eval()

    def parameter_counts(self) -> dict:
        """stored: everything kept (W0, every expert, every head); shared: W0 (with the
        BatchNorm affine); experts: every task's A/B factors; deployed[t]: task t's fused model."""
        experts = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in self.modules_with_experts())
        heads = [sum(p.numel() for p in h.parameters()) for h in self.heads]
        stored = sum(p.numel() for p in self.parameters())
        shared = stored - experts - sum(heads)
        return {"stored": stored, "shared": shared, "experts": experts, "heads": heads,
                "deployed": [shared + h for h in heads]}


def mask_to_tasks(logits: torch.Tensor, task_ids: torch.Tensor, class_task: torch.Tensor) -> torch.Tensor:
    """Logits over all tasks' classes with -inf outside each sample's task (argmax stays in it)."""
    own = class_task[None, :] == task_ids.to(class_task.device)[:, None]
    return logits.masked_fill(~own, float("-inf"))
