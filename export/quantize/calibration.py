"""Calibration images fed to the quantizers, and the calibration methods medkd offers.

Only MinMax and Percentile: ONNX Runtime's entropy calibrator gives MinMax's scales with
its default options and clipped the logits with a real histogram (measured on the default
ResNet-18), so it is not offered.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

# medkd name -> (ONNX Runtime method, extra options for it)
CALIBRATION_METHODS: dict[str, tuple[CalibrationMethod, dict]] = {
    "minmax": (CalibrationMethod.MinMax, {}),
    "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.999}),
}
CALIBRATION_BATCH = 32


class ArrayReader(CalibrationDataReader):
    """Feeds N×C×H×W float32 images to ONNX Runtime's calibrator in fixed-size batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.input_name = input_name
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0
