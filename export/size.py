"""Size helpers: file size of an exported artifact, parameter count of a model."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from medkd.toolchain.errors import UserError

__all__ = ["model_file_size_bytes", "count_parameters"]


def model_file_size_bytes(path: str | os.PathLike) -> int:
    """Size in bytes of a model file (e.g. the exported ``.onnx``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    return path.stat().st_size


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
