"""PEFT baseline: the foundation model itself fine-tuned with LoRA plus a linear head.

The comparator the RD paper uses, and an upper bound on what the frozen teacher can give
the students of the other recipes. To stay within CPU reach only the end of the encoder
is fine-tuned: LiteMedSAM's TinyViT is split at the input of its last stage.

    frozen, cached once:  teacher preprocessing -> patch embed -> stages 0..2
    trained:              stage 3 + neck (PEFT LoRA on their linears/convs) -> GAP -> head

`feature_extractor` makes the pipeline cache the frozen part's output (the last stage's
input tokens, flattened to N x L*C) as the "teacher features"; the loss runs only the
trainable part on them: loss = CE on the labelled rows (lora does not learn from images
whose labels were withheld). The copied stage's and neck's base weights stay frozen
(PEFT freezes everything that is not an adapter) and so do their BatchNorm statistics.

The `student` the pipeline builds from `student=` is not trained: only its class count is
read. The model that is evaluated, saved as student.safetensors and exported is the whole
fine-tuned foundation model (`FineTunedFoundationModel`): images N x C x H x W in [0, 1]
through the teacher's own preprocessing to logits. The export's fold stage merges its LoRA
weights with PEFT's merge_and_unload (and checks the outputs did not move), so the ONNX,
int8, bundle, firmware and latency steps see a plain TinyViT classifier.

Only teacher=litemedsam is supported (its stages are known); other teachers are refused
with a one-line ConfigError.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medkd.toolchain.errors import ConfigError
from medkd.toolchain.models.students import count_parameters
from medkd.toolchain.models.teachers import FrozenTeacher

from .base import Batch, Recipe, labelled_cross_entropy

SUPPORTED_TEACHERS = ("litemedsam",)
# Bump when the split point or the frozen part's computation changes: it keys the cache.
INTERMEDIATE_VERSION = 1


def _tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens N x (H*W) x C (row-major) -> feature map N x C x H x W.

    view(-1, ...) rather than unflatten: the ONNX tracer keeps a -1 batch dynamic, while
    unflatten here came out with the sample's batch size baked in."""
    return x.view(-1, grid[0], grid[1], x.shape[-1]).permute(0, 3, 1, 2)


class LiteMedSAMEarlyStages(nn.Module):
    """The frozen part: the teacher's preprocessing, patch embedding and every stage but the
    last; forward(images) -> the last stage's input tokens flattened, N x (L*C) float32.

    Shares (does not copy) the teacher's frozen modules and, like the teacher, stays in eval
    mode whatever `.train()` is called with.
    """

    def __init__(self, teacher: FrozenTeacher):
        super().__init__()
        encoder = teacher.encoder
        mean = None if teacher.mean is None else tuple(teacher.mean.flatten().tolist())
        std = None if teacher.std is None else tuple(teacher.std.flatten().tolist())
        # A weightless FrozenTeacher: the teacher's own preprocess() (one home for it).
        self.preprocessing = FrozenTeacher(teacher.name, teacher.feature_dim, teacher.input_size,
                                           teacher.fingerprint, mean=mean, std=std, minmax=teacher.minmax)
        self.patch_embed = encoder.patch_embed
        self.stages = nn.ModuleList(list(encoder.layers)[:-1])
        last = encoder.layers[-1]
        self.grid = tuple(last.input_resolution)
        self.channels = int(last.dim)
        self.feature_dim = self.grid[0] * self.grid[1] * self.channels
        self.fingerprint = f"{teacher.fingerprint}-lora-input-v{INTERMEDIATE_VERSION}"

    def train(self, mode: bool = True) -> "LiteMedSAMEarlyStages":
        return super().train(False)  # frozen BatchNorm statistics, cached attention biases

    # preprocess/extract split like a FrozenTeacher's, so the ONNX Runtime teacher backend
    # (teacher_runtime.py) exports only the network, at the teacher's input size.
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.preprocess(images)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.stages:
            x = stage(x)
        # A constant width (not flatten(1)): an exported graph then declares N x feature_dim.
        return x.reshape(-1, self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.preprocess(images))


class LiteMedSAMLastStage(nn.Module):
    """A copy of the teacher's last stage and neck: tokens N x (L*C) -> pooled N x 256, the
    teacher's own feature (global average pool of the neck's output)."""

    def __init__(self, encoder: nn.Module, grid: tuple[int, int], channels: int):
        super().__init__()
        self.stage = copy.deepcopy(encoder.layers[-1])
        self.neck = copy.deepcopy(encoder.neck)
        self.grid = grid
        self.channels = channels

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.stage(tokens.view(-1, self.grid[0] * self.grid[1], self.channels))
        return self.neck(_tokens_to_map(x, self.grid)).mean(dim=(2, 3))


class FineTunedFoundationModel(nn.Module):
    """The deployable: images in [0, 1] -> logits, through the frozen early stages, the
    LoRA-adapted last stage + neck and the linear head."""

    def __init__(self, early: LiteMedSAMEarlyStages, late: nn.Module, head: nn.Linear, description: str):
        super().__init__()
        self.early = early
        self.late = late  # a PeftModel until merge_and_unload()
        self.head = head
        self.description = description

    def from_intermediate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from cached early-stage outputs (what training runs on)."""
        return self.head(self.late(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            return self.from_intermediate(self.early(images))
        with warnings.catch_warnings():
            # The ONNX trace: the teacher's preprocessing and TinyViT's blocks check shapes in
            # Python; the graph is exported for one image size, so these are constants by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return self.from_intermediate(self.early(images))

    def train(self, mode: bool = True) -> "FineTunedFoundationModel":
        super().train(mode)
        # The base weights are frozen, so are their BatchNorm statistics (TinyViT's Conv2d_BN
        # in the copied stage); LoRA dropout still follows `mode`.
        for module in self.late.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self

    def merge_and_unload(self) -> "FineTunedFoundationModel":
        """Merge the LoRA weights into their base layers in place (PEFT's merge_and_unload) and
        drop the adapters; the export's fold stage calls this on a copy."""
        if hasattr(self.late, "merge_and_unload"):
            self.late = self.late.merge_and_unload()
        return self

    def parameter_counts(self) -> dict:
        """For the report: the deployed (merged) model's size, and what fine-tuning trained."""
        lora = sum(p.numel() for n, p in self.late.named_parameters() if "lora_" in n)
        head = count_parameters(self.head)
        total = count_parameters(self) - lora  # merging folds the adapters into the base weights
        return {"model": self.description, "total": total, "trainable": lora + head, "lora": lora, "head": head}


def lora_config(cfg):
    """peft.LoraConfig from the recipe section; bad values -> one-line ConfigError."""
    from peft import LoraConfig

    rank, alpha, dropout = cfg.get("rank"), cfg.get("lora_alpha"), cfg.get("lora_dropout")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"recipe.rank must be a positive integer, got '{rank}'")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"recipe.lora_alpha must be a number > 0, got '{alpha}'")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"recipe.lora_dropout must be a number in [0, 1), got '{dropout}'")
    targets = cfg.get("target_modules")
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    if not targets or not isinstance(targets, (str, list)):
        raise ConfigError(f"recipe.target_modules must be a list of module names (or a regex), got '{targets}'")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, bias="none")


def _lr_scale(cfg, key: str) -> float:
    value = cfg.get(key, 1.0)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"recipe.{key} must be a number > 0, got '{value}'")
    return float(value)


def with_lora(module: nn.Module, config) -> nn.Module:
    """`module` wrapped by PEFT (every base weight frozen, adapters trainable)."""
    from peft import get_peft_model

    try:
        return get_peft_model(module, config)
    except ValueError as exc:  # PEFT's "Target modules ... not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        targets = config.target_modules  # PEFT turns a list into a set
        targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
        raise ConfigError(f"recipe.target_modules={targets} matches no layer of the last stage "
                          f"or neck ({str(exc).splitlines()[0][:80]}); layer names there: {', '.join(names)}") from None


class LoRARecipe(Recipe):
    name = "lora"
    needs_teacher = True
    needs_teacher_module = True
    uses_unlabelled = False

    def __init__(self, cfg, student, teacher: FrozenTeacher):
        if getattr(teacher, "name", None) not in SUPPORTED_TEACHERS:
            raise ConfigError(f"recipe=lora fine-tunes the last stage of teacher=litemedsam only, "
                              f"not teacher={getattr(teacher, 'name', type(teacher).__name__)}")
        image_size = getattr(student, "image_size", None)
        if image_size is not None and teacher.input_size < image_size:
            # The deployable includes the teacher's preprocessing; its downsizing is antialiased,
            # which the ONNX exporter has no operator for (upsizing is plain bilinear).
            raise ConfigError(f"recipe=lora exports the teacher's own resize, and shrinking the {image_size} px "
                              f"images to teacher.input_size={teacher.input_size} (antialiased) has no ONNX "
                              f"export; use teacher.input_size >= {image_size}")
        config = lora_config(cfg)
        early = LiteMedSAMEarlyStages(teacher)
        late = with_lora(LiteMedSAMLastStage(teacher.encoder, early.grid, early.channels), config)
        # The pipeline's student (student=) is not trained: only its class count is used.
        head = nn.Linear(teacher.feature_dim, student.num_classes)
        description = (f"{teacher.name} ({teacher.input_size}px) + LoRA r={config.r} on the last stage "
                       "and neck (merged) + linear head")
        super().__init__(FineTunedFoundationModel(early, late, head, description))
        self.lora_lr_scale = _lr_scale(cfg, "lora_lr_scale")
        self.head_lr_scale = _lr_scale(cfg, "head_lr_scale")

    def feature_extractor(self, teacher: nn.Module) -> nn.Module:
        """Cache the frozen early stages' output (the last stage's input), not the pooled features."""
        return self.student.early

    def parameter_groups(self, lr: float) -> list[dict]:
        """The LoRA adapters at lora_lr_scale x train.lr, the head at head_lr_scale x; nothing else trains."""
        lora = [p for p in self.student.late.parameters() if p.requires_grad]
        return [{"params": lora, "lr": lr * self.lora_lr_scale},
                {"params": list(self.student.head.parameters()), "lr": lr * self.head_lr_scale}]

    def loss(self, batch: Batch):
        ce = labelled_cross_entropy(self.student.from_intermediate(batch.teacher_features), batch.labels)
        return ce, {"ce": ce.detach()}

    def deployable(self) -> nn.Module:
        """The whole fine-tuned foundation model (not the `student=` network), LoRA unmerged:
        the export's fold stage merges it (merge_and_unload)."""
        return self.student
