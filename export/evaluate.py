"""Run an ONNX model with ONNX Runtime on CPU and compare it with a reference.

The task metric is a function (logits, labels) -> float, so the guard and the report work
for any task: accuracy for classification, Dice for segmentation (toolchain/seg_metrics.py).
"Agreement" (the report's top1_agreement) is taken over the class axis: per image for a
classifier, per pixel for a segmenter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def class_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """How often the two pick the same class (argmax over axis 1, the class axis): per image
    for a classifier's N x K logits, per pixel for a segmenter's N x K x H x W."""
    return float((reference.argmax(1) == candidate.argmax(1)).mean())


def onnx_logits(path: Path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # quantized graphs log one warning per unused initializer
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(outputs).astype(np.float32)


@dataclass(frozen=True)
class Comparison:
    """A candidate model's outputs against the reference's on the same labelled images."""

    max_abs_diff: float
    top1_agreement: float
    reference_metric: float
    candidate_metric: float
    num_samples: int

    @property
    def metric_drop_points(self) -> float:
        """How far the candidate's metric falls below the reference's, in percentage points."""
        return 100.0 * (self.reference_metric - self.candidate_metric)

    def as_dict(self) -> dict:
        return {**asdict(self), "metric_drop_points": self.metric_drop_points}


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, metric: Metric) -> Comparison:
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: {candidate.shape} vs reference {reference.shape}")
    return Comparison(
        max_abs_diff=float(np.abs(reference.astype(np.float64) - candidate).max()),
        top1_agreement=class_agreement(reference, candidate),
        reference_metric=metric(reference, labels),
        candidate_metric=metric(candidate, labels),
        num_samples=len(reference),
    )
