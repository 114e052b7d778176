"""Small segmentation students: images N x C x H x W -> class logits N x K x H x W.

    @register_segmenter("vit_tiny_seg")
    def build_vit_tiny_seg(cfg: dict, num_classes, in_chans, image_size) -> Segmenter: ...

vit_tiny_seg  TS-KD's student: timm's ViT-Tiny (192-d tokens, 12 blocks, 3 heads, 5.5M
              parameters) rebuilt for image_size and patch_size (default 8: a 16 x 16 token
              grid at 128 px), no class token, plus a light decoder: log2(patch_size) steps
              of 3x3 conv + BatchNorm + ReLU + 2x bilinear upsampling, halving the channels
              (192 -> 96 -> 48 -> 24 at patch 8), then a 1x1 conv to the K classes. The BNs
              fold into the convs at export. Built with pretrained=False; weights only ever
              come from a local file (pretrained_checkpoint).

`Segmenter.tokens(x)` gives the encoder's N x T x D tokens (row-major on the grid) for feature
distillation; `grid` is the token grid's side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from . import _register
from .teachers import _cfg_dict, _strict_load, load_state_bytes

_SEGMENTERS: dict[str, Callable] = {}


def register_segmenter(name: str):
    """Decorator: register `fn(cfg: dict, num_classes, in_chans, image_size) -> Segmenter`."""
    return _register(_SEGMENTERS, "segmenter", name)


def available_segmenters() -> list[str]:
    return sorted(_SEGMENTERS)


class UpsamplingDecoder(nn.Module):
    """Token map N x D x g x g -> logits N x K x (g * 2^steps)^2."""

    def __init__(self, in_channels: int, num_classes: int, steps: int):
        super().__init__()
        blocks, channels = [], in_channels
        for _ in range(steps):
            out = max(channels // 2, 16)
            blocks.append(nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                                        nn.ReLU(inplace=True), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                           align_corners=False)))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x))


class Segmenter(nn.Module):
    """A ViT encoder (tokens on a grid x grid map) and an upsampling decoder."""

    def __init__(self, name: str, encoder: nn.Module, embed_dim: int, patch_size: int, num_classes: int,
                 in_chans: int, image_size: int):
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.decoder = UpsamplingDecoder(embed_dim, num_classes, int(math.log2(patch_size)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens N x T x D (row-major on the grid) -> logits N x K x image_size x image_size."""
        token_map = tokens.transpose(1, 2).reshape(-1, self.embed_dim, self.grid, self.grid)
        return self.decoder(token_map)  # patch_size is a power of 2: back at image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.tokens(x))


@register_segmenter("vit_tiny_seg")
def build_vit_tiny_seg(cfg: dict, num_classes: int, in_chans: int, image_size: int) -> Segmenter:
    import timm

    patch = cfg.get("patch_size", 8)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 2 or patch & (patch - 1):
        raise UserError(f"student.patch_size of vit_tiny_seg must be a power of 2 >= 2 (the decoder "
                        f"upsamples 2x per step), got '{patch}'")
    if image_size % patch:
        raise UserError(f"vit_tiny_seg needs data.image_size divisible by student.patch_size: "
                        f"{image_size} % {patch} != 0")
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=image_size,
                                patch_size=patch, in_chans=in_chans, class_token=False, global_pool="avg")
    model = Segmenter("vit_tiny_seg", encoder, encoder.embed_dim, patch, num_classes, in_chans, image_size)
    if cfg.get("pretrained_checkpoint"):
        _load_segmenter_checkpoint(model, cfg["pretrained_checkpoint"])
    return model


def _load_segmenter_checkpoint(model: Segmenter, value: Any) -> None:
    """Initialise the encoder from a local file: a saved Segmenter or a bare ViT state dict."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UserError(f"student pretrained_checkpoint '{path}' does not exist; pass an existing file or null")
    state = load_state_bytes(path.read_bytes(), str(path))
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    _strict_load(model.encoder, state, str(path), f"the {model.name} encoder")


def build_segmenter(cfg: Any, num_classes: int, in_chans: int, image_size: int) -> Segmenter:
    """Build the segmentation student named by cfg.name."""
    cfg = _cfg_dict(cfg)
    name = cfg.get("name")
    if name not in _SEGMENTERS:
        raise UserError(f"unknown segmentation student '{name}'; choose one of: "
                        f"{', '.join(available_segmenters())} (student=NAME)")
    if num_classes < 2:
        raise UserError(f"a segmenter needs at least 2 classes (background and one more), got {num_classes}")
    return _SEGMENTERS[name](cfg, num_classes, in_chans, image_size)
