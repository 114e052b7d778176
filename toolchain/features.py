"""Frozen-teacher features, extracted once and cached on disk.

    feats = teacher_features(teacher, task.train.images, cache_dir=Path(".cache/medkd"))

The cache file is `cache_dir/<teacher.fingerprint>-<images digest>.safetensors`, where
the images digest is the SHA-256 of the tensor's dtype, shape and bytes, and the
fingerprint covers the teacher's architecture, input size, preprocessing and weights
content (and, for a teacher run by ONNX Runtime, the backend and precision:
medkd.toolchain.models.teacher_runtime). Files are written atomically (temporary file + os.replace), so a killed run
never leaves a half-written cache entry; an unreadable or inconsistent entry (bad
file, wrong shape/dtype, non-finite values) is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_save
from .progress import as_policy

FEATURES_KEY = "features"


def images_digest(images: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and the raw bytes of a (CPU) tensor."""
    x = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{x.dtype}|{tuple(x.shape)}|".encode())
    if x.numel():
        digest.update(x.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cache_path(teacher: nn.Module, images: torch.Tensor, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{teacher.fingerprint}-{images_digest(images)}.safetensors"


def _load_cached(path: Path, n: int, dim: int) -> torch.Tensor | None:
    """The cached features, or None (with a warning) if the file is damaged."""
    from safetensors.torch import load_file

    try:
        feats = load_file(str(path))[FEATURES_KEY]
    except Exception as exc:  # truncated/garbage file, missing key, ...
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if tuple(feats.shape) != (n, dim) or feats.dtype != torch.float32:
            problem = f"holds {feats.dtype} {tuple(feats.shape)}, expected float32 {(n, dim)}"
        elif not torch.isfinite(feats).all():
            problem = "holds non-finite values"
        else:
            return feats
    warnings.warn(f"teacher-feature cache {path} is {problem}; recomputing it", RuntimeWarning, stacklevel=3)
    return None


@torch.no_grad()
def _extract(teacher: nn.Module, images: torch.Tensor, batch_size: int, desc: str, progress,
             device: torch.device | str | None = None) -> torch.Tensor:
    teacher.eval()
    params = list(teacher.parameters())
    home = params[0].device if params else torch.device("cpu")
    # A torch teacher runs on `device` (the training GPU) for the extraction and goes back home
    # after: export and the recipes expect it where it was. A module without parameters (ONNX
    # Runtime's extractor) runs where it is.
    run_on = torch.device(device) if device is not None and params else home
    n = images.shape[0]
    out = torch.empty(n, teacher.feature_dim, dtype=torch.float32)
    teacher.to(run_on)
    try:
        with as_policy(progress).bar(total=n, desc=desc, unit="img") as bar:
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size].to(run_on)
                out[start : start + batch.shape[0]] = teacher(batch).float().cpu()
                bar.update(batch.shape[0])
    finally:
        teacher.to(home)
    return out


def teacher_features(
    teacher: nn.Module,
    images: torch.Tensor,
    cache_dir: str | Path | None,
    batch_size: int = 32,
    desc: str = "teacher features",
    progress: bool | str | None = "auto",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Teacher features (N x teacher.feature_dim, float32, CPU) for images N x C x H x W.

    With `cache_dir`, a previous result for the same teacher fingerprint and the same
    image bytes is loaded instead of running the teacher. `progress`: a ProgressPolicy,
    True/False, or "auto"/None (a bar on a terminal, periodic lines elsewhere). `device`: where
    a torch teacher runs (e.g. the training GPU; None: where it is); ONNX Runtime stays on the CPU.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n, dim = images.shape[0], int(teacher.feature_dim)
    path = cache_path(teacher, images, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        feats = _load_cached(path, n, dim)
        if feats is not None:
            return feats
    feats = _extract(teacher, images, batch_size, desc, progress, device)
    if path is not None:
        from safetensors.torch import save_file

        metadata = {"fingerprint": str(teacher.fingerprint), "num_images": str(n)}
        atomic_save(path, lambda tmp: save_file({FEATURES_KEY: feats}, str(tmp), metadata=metadata))
    return feats


def view_teacher_features(features, images: torch.Tensor, views, split: str) -> torch.Tensor:
    """K x N x D: `features(images, desc)` of each of the K views (a data.augment.ViewTable) of
    `images`, rendered one view at a time (one extra copy of the images in memory); with a
    caching `features`, each view is cached on its own, view 0 shared with un-augmented runs."""
    out = None
    for view in range(views.views):
        rendered = images if view == 0 else views.render_view(images, view)
        feats = features(rendered, f"{split}, view {view + 1}/{views.views}")
        if out is None:
            out = torch.empty(views.views, *feats.shape, dtype=feats.dtype)
        out[view] = feats
    return out
