"""Numerical parity between a PyTorch model and its ONNX export (onnxruntime, CPU)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medkd.toolchain.errors import UserError

from .onnx_export import _EvalMode

__all__ = ["onnx_parity"]


def _batches(inputs: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        batches = [inputs]
    else:
        batches = list(inputs)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() < 1 or b.shape[0] == 0 for b in batches):
        raise UserError("parity inputs must be a non-empty tensor (N×...) or a non-empty list of such tensors")
    return batches


def onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor | Iterable[torch.Tensor],
) -> dict:
    """Compare `model` (eval mode) with the ONNX file on `inputs`.

    `inputs` is one batch N×C×H×W or an iterable of batches. Returns
    ``{"max_abs_diff", "mean_abs_diff", "top1_agreement", "num_samples"}`` where the
    diffs are over all logits and ``top1_agreement`` is the fraction of class decisions (one
    per image, or one per pixel for a segmenter's N×K×H×W logits) whose arg-max over the class
    axis is the same in both runtimes. The model's train/eval flags are restored.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    batches = _batches(inputs)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name

    max_abs = 0.0
    abs_sum = 0.0
    count = 0
    agree = 0
    decisions = 0
    samples = 0
    with _EvalMode(model), torch.no_grad():
        for x in batches:
            ref = model(x).detach().cpu().float().numpy()
            got = sess.run(None, {input_name: x.detach().cpu().numpy()})[0].astype(np.float32)
            if ref.shape != got.shape:
                raise UserError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
            diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
            max_abs = max(max_abs, float(diff.max()))
            abs_sum += float(diff.sum())
            count += diff.size
            picks = ref.argmax(1) == got.argmax(1)  # the class axis: per image, or per pixel (segmenters)
            agree += int(picks.sum())
            decisions += picks.size
            samples += ref.shape[0]
    return {
        "max_abs_diff": max_abs,
        "mean_abs_diff": abs_sum / count,
        "top1_agreement": agree / decisions,
        "num_samples": samples,
    }
