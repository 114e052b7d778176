"""Small students: a timm backbone (num_classes=0 -> pooled features) + a linear head.

`Student.head` is a plain `nn.Linear(feature_dim, num_classes)` attribute because the
RD recipe applies the *same* classifier to reprogrammed teacher features. Students
are built with pretrained=False; `pretrained_checkpoint` optionally initialises the
backbone from a local file (.safetensors or .pth/.pt via weights_only). Forward passes
have no data-dependent Python control flow, so students export to ONNX.

Students (cfg.name -> timm architecture):

resnet18     `resnet18` (11.2M params, 512-d features).
mobilenetv3  `mobilenetv3_small_100` (1.5M params, 1024-d features). The small variant
             rather than `_large_100` (4.2M, 1280-d): the point of the toolchain is an
             edge model for 28-64 px images and a few thousand training images, where
             large's extra capacity mostly adds latency/overfitting, and resnet18
             already covers the "bigger student" end.
vit_tiny     `vit_tiny_patch16_224` rebuilt with img_size=image_size and
             patch_size=cfg.patch_size (default 4 -> an 8x8 token grid at 32 px, 7x7 at
             28 px; null picks the divisor of image_size closest to image_size/8).
             192-d CLS-token features. image_size must be divisible by patch_size.

Small-input stem (`small_input_stem`, default null = true when image_size <= 64):
ImageNet stems downsample 4x before the first stage - resnet18's 7x7/2 conv + 3x3/2
maxpool turns 32 px into 8 px before layer1 and 1x1 at layer4. With the option,
resnet18 uses a 3x3/1 conv and no maxpool (the CIFAR-style stem: 32 px stays 32 px in
layer1, 4x4 at layer4). It costs ~16x the FLOPs of the default stem at the same input:
measured at 32 px, 1 channel, 2 threads on the shared 2-core box: forward 1.11 vs 0.07
GFLOP/img, a batch-128 AdamW train step ~41 vs ~3 ms/img (12 epochs x 2,500 images
~20 min vs ~1.5 min). Set `small_input_stem: false` when training time matters more
than accuracy. (For reference vit_tiny at patch 4: 0.69 GFLOP/img, ~67 ms/img train
step; mobilenetv3 with its stride-1 stem: 0.01 GFLOP/img, ~4 ms/img.) mobilenetv3 gets the same
treatment in spirit: its 3x3/2 stem conv becomes 3x3/1 (32 px -> 2x2 instead of 1x1
at the last stage). vit_tiny has no stem; patch_size plays that role.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from . import get_student_builder, register_student
from .teachers import _cfg_dict, _drop_classifier, _strict_load, load_state_bytes

SMALL_INPUT_MAX_SIZE = 64


class Student(nn.Module):
    """backbone (pooled features, N x feature_dim) -> head (nn.Linear) -> logits."""

    def __init__(
        self,
        name: str,
        arch: str,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        in_chans: int,
        image_size: int,
    ):
        super().__init__()
        self.name = name
        self.arch = arch
        self.in_chans = in_chans
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_dim = int(feature_dim)
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def extra_repr(self) -> str:
        return f"name={self.name}, arch={self.arch}, feature_dim={self.feature_dim}"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


# ---------------------------------------------------------------------------------------


def _check_sizes(num_classes: int, in_chans: int, image_size: int) -> None:
    for value, key in ((num_classes, "num_classes"), (in_chans, "in_chans"), (image_size, "image_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"student {key} must be a positive integer, got '{value}'")


def _small_stem(cfg: dict, image_size: int) -> bool:
    value = cfg.get("small_input_stem")
    if value is None:
        return image_size <= SMALL_INPUT_MAX_SIZE
    if not isinstance(value, bool):
        raise UserError(f"student.small_input_stem must be true, false or null, got '{value}'")
    return value


def _timm(arch: str, **kwargs) -> nn.Module:
    import timm

    # pretrained=False always: initial weights only ever come from a local file.
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _feature_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _load_pretrained(student: Student, path_value: Any) -> None:
    """Initialise the backbone (and the head when it fits) from a local checkpoint."""
    path = Path(str(path_value)).expanduser()
    if not path.is_file():
        raise UserError(
            f"student pretrained_checkpoint '{path}' does not exist; pass an existing file or null"
        )
    state = load_state_bytes(path.read_bytes(), str(path))
    head_state = {}
    if any(k.startswith("backbone.") for k in state):  # a saved Student state dict
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = student.backbone
    state = _drop_classifier(state, backbone)
    first = f"{backbone.pretrained_cfg.get('first_conv', '')}.weight"
    own = backbone.state_dict()
    if first in state and first in own and state[first].shape != own[first].shape:
        want, got = own[first].shape, state[first].shape
        if want[0] == got[0] and want[2:] == got[2:]:  # only the input channels differ (RGB -> gray)
            from timm.models import adapt_input_conv

            state[first] = adapt_input_conv(want[1], state[first])
    _strict_load(backbone, state, str(path), f"student '{student.name}' ({student.arch})")
    head = student.head.state_dict()
    if head_state and all(k in head_state and head_state[k].shape == v.shape for k, v in head.items()):
        student.head.load_state_dict(head_state)


def _finish(student: Student, cfg: dict) -> Student:
    if cfg.get("pretrained_checkpoint"):
        _load_pretrained(student, cfg["pretrained_checkpoint"])
    return student


@register_student("resnet18")
def build_resnet18(cfg: dict, num_classes: int, in_chans: int, image_size: int) -> Student:
    arch = "resnet18"
    backbone = _timm(arch, in_chans=in_chans)
    if _small_stem(cfg, image_size):
        backbone.conv1 = nn.Conv2d(in_chans, backbone.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    student = Student("resnet18", arch, backbone, _feature_dim(backbone), num_classes, in_chans, image_size)
    return _finish(student, cfg)


@register_student("mobilenetv3")
def build_mobilenetv3(cfg: dict, num_classes: int, in_chans: int, image_size: int) -> Student:
    arch = "mobilenetv3_small_100"
    backbone = _timm(arch, in_chans=in_chans)
    if _small_stem(cfg, image_size):
        backbone.conv_stem.stride = (1, 1)  # 3x3 kernel, padding 1: keeps the resolution
    student = Student("mobilenetv3", arch, backbone, _feature_dim(backbone), num_classes, in_chans, image_size)
    return _finish(student, cfg)


def _auto_patch_size(image_size: int) -> int:
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return min(divisors, key=lambda p: (abs(p - image_size / 8), -p))


@register_student("vit_tiny")
def build_vit_tiny(cfg: dict, num_classes: int, in_chans: int, image_size: int) -> Student:
    arch = "vit_tiny_patch16_224"
    patch = cfg.get("patch_size")
    if patch is None:
        patch = _auto_patch_size(image_size)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        raise UserError(f"student.patch_size must be a positive integer or null, got '{patch}'")
    if image_size % patch:
        raise UserError(
            f"vit_tiny needs image_size divisible by student.patch_size: {image_size} % {patch} != 0; "
            "pick a divisor (e.g. student.patch_size=4 for 28 or 32 px)"
        )
    backbone = _timm(arch, in_chans=in_chans, img_size=image_size, patch_size=patch)
    student = Student("vit_tiny", arch, backbone, _feature_dim(backbone), num_classes, in_chans, image_size)
    student.patch_size = patch
    return _finish(student, cfg)


def build_student(cfg: Any, num_classes: int, in_chans: int, image_size: int) -> Student:
    """Build the student named by cfg.name for a task of this shape."""
    cfg = _cfg_dict(cfg)
    _check_sizes(num_classes, in_chans, image_size)
    return get_student_builder(cfg.get("name"))(cfg, num_classes, in_chans, image_size)
