"""Post-training quantization of an exported fp32 ONNX model: one entry, one module per mode.

`quantize(preset, fp32_onnx, out_path, ...)` is the only function callers need. A preset
names a layout, not a library (the library is an implementation detail the result
reports):

==================  ==========================================================  ===============
preset              layout                                                      library
==================  ==========================================================  ===============
``int8-tensorrt``   explicit Q/DQ for TensorRT: per-channel symmetric int8       NVIDIA ModelOpt
                    weights (stored as int8, DQ only), symmetric int8            (ORT QDQ as
                    activations, Q/DQ placed the way TensorRT fuses them;        fallback)
                    unquantized layers in fp32 (see int8_tensorrt.py)
``int8-cpu``        ONNX Runtime's fully-integer CPU layout: per-channel         onnxruntime
                    symmetric int8 weights, *unsigned* int8 activations with a
                    zero point (symmetric activations leave ReLUs in float and
                    run slower than fp32 on CPU)
``fp16``            weights and activations fp16, inputs/outputs stay fp32      onnxruntime float16
==================  ==========================================================  ===============

medkd writes no quantizer of its own: each mode module only chooses a well-kept library's
options and checks what came out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medkd.toolchain.errors import UserError

from .calibration import CALIBRATION_METHODS
from .fp16 import convert_fp16
from .inspection import QuantizeResult, weighted_nodes
from .int8_cpu import quantize_int8_cpu
from .int8_tensorrt import quantize_int8_tensorrt

PRESETS = {
    "int8-tensorrt": quantize_int8_tensorrt,
    "int8-cpu": quantize_int8_cpu,
    "fp16": convert_fp16,
}

__all__ = ["CALIBRATION_METHODS", "PRESETS", "QuantizeResult", "quantize", "weighted_nodes"]


def quantize(
    preset: str,
    fp32_onnx: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    exclude: tuple[str, ...] | list[str] = (),
    ranges_cache: str | os.PathLike | None = None,
) -> QuantizeResult:
    """Quantize `fp32_onnx` with `preset` into `out_path` (written atomically).

    `calibration` is N×C×H×W float32 images (int8 presets only); `exclude` names ONNX
    nodes to keep in high precision (the accuracy guard's sensitive layers); `ranges_cache`
    a file that keeps ONNX Runtime's calibrated ranges between calls on the same model and
    images (see _common.ort_qdq; the caller owns its lifetime and key).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown quantization preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if method not in CALIBRATION_METHODS:
        raise UserError(f"export.calibration.method must be one of {', '.join(CALIBRATION_METHODS)}, got '{method}'")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if preset.startswith("int8"):
        if calibration is None or len(calibration) == 0:
            raise UserError("int8 quantization needs calibration images")
        return PRESETS[preset](fp32_onnx, out_path, np.ascontiguousarray(calibration, np.float32), method, tuple(exclude),
                               ranges_cache=None if ranges_cache is None else Path(ranges_cache))
    return PRESETS[preset](fp32_onnx, out_path)
