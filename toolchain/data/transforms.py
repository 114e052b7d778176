"""Array -> tensor conversion and resizing shared by the loaders."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Resize in chunks so a 60k-image set never needs a second full-size float copy at once.
_RESIZE_CHUNK = 4096


def to_nchw_float(images: np.ndarray) -> torch.Tensor:
    """N x H x W (gray) or N x H x W x C -> float32 N x C x H x W; uint8 is divided by 255,
    anything else is taken as already scaled (intensity.py)."""
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    if images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of N x C x H x W to N x C x size x size (no-op if equal)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.float32)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        # Bilinear weights are non-negative so the clamp only removes float rounding at 0 and
        # 1; infinite values stay (clamp would make them 1) for validate.py to report.
        out[start : start + _RESIZE_CHUNK] = torch.where(resized.isinf(), resized, resized.clamp(0.0, 1.0))
    return out


def patches_to_images(patches: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W patches (any strides, e.g. mirrored views) as N x 1 x size x size images."""
    return resize_images(torch.from_numpy(np.ascontiguousarray(patches))[:, None], size)
