"""int8 for TensorRT: explicit Q/DQ (TensorRT 11 has no implicit INT8 calibrator).

NVIDIA ModelOpt places Q/DQ where TensorRT fuses them (only the skip input of a residual
Add is quantized, so Conv+Add+ReLU fuse) and stores weights as int8 with DequantizeLinear
only (`dq_only`). A strongly typed TensorRT network takes every precision from the graph,
so the unquantized layers run in whatever dtype the ONNX gives them.

We keep them fp32 (ModelOpt's `high_precision_dtype="fp32"`), not ModelOpt's default
fp16: on the default ResNet-18 student, int8 with fp16 elsewhere lost several points of
accuracy under ONNX Runtime while int8 with fp32 elsewhere, and the fp16 model alone, lost
none (the 2026-11-25 closing note has the figures). The Q/DQ scales and biases converted
to fp16 are the likely cause (ModelOpt warns that values below fp16's range are
replaced). fp32 costs some speed on layers TensorRT does not run in int8; an fp16 engine
is still built from `model.fp16.onnx` when int8 is refused.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from medkd.toolchain.atomic import atomic_path

from ._common import input_name, library_version, ort_qdq, quiet_libraries
from .inspection import QuantizeResult, describe
from .int8_cpu import exclusion_reasons


def modelopt_unavailable() -> str | None:
    """None when ModelOpt's ONNX quantizer imports, else why not."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        return f"nvidia-modelopt is not usable here ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
    return None


@contextlib.contextmanager
def _ort_calibration_restored():
    """Undo ModelOpt's monkey-patching of ONNX Runtime's calibrators after it runs.

    ModelOpt replaces methods of ORT's calibrator and quantizer classes process-wide; left
    in place, a later plain ORT quantization in the same process (the cpu layout, the
    percentile fallback) fails or calibrates differently.
    """
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer

    owners = [calibrate, calibrate.CalibraterBase, calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater,
              calibrate.HistogramCollector, qdq_quantizer.QDQQuantizer, base_quantizer.BaseQuantizer]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    try:
        yield
    finally:
        for owner, attributes in saved:
            for name in set(vars(owner)) - set(attributes):
                delattr(owner, name)
            for name, value in attributes.items():
                if vars(owner).get(name) is not value and not name.startswith("__"):
                    setattr(owner, name, value)


def _quantize_modelopt(fp32_onnx: Path, tmp: Path, calibration: np.ndarray, nodes_to_exclude: list[str]) -> None:
    from modelopt.onnx.quantization import quantize as modelopt_quantize

    with _ort_calibration_restored():
        modelopt_quantize(
            str(fp32_onnx),
            quantize_mode="int8",
            calibration_data={input_name(fp32_onnx): calibration},
            calibration_method="max",
            calibration_eps=["cpu"],
            nodes_to_exclude=nodes_to_exclude or None,
            dq_only=True,
            high_precision_dtype="fp32",
            output_path=str(tmp),
            log_level="CRITICAL",  # it logs an ERROR on every run where no NVIDIA driver is present
        )


def quantize_int8_tensorrt(fp32_onnx: Path, out_path: Path, calibration: np.ndarray, method: str,
                           exclude: tuple[str, ...], ranges_cache: Path | None = None) -> QuantizeResult:
    reasons = exclusion_reasons(fp32_onnx, exclude)
    use_modelopt = method == "minmax" and modelopt_unavailable() is None
    with atomic_path(out_path) as tmp, quiet_libraries():
        if use_modelopt:  # calibrates every call: ModelOpt has no range cache
            _quantize_modelopt(fp32_onnx, tmp, calibration, sorted(reasons))
        else:
            ort_qdq(fp32_onnx, tmp, calibration, method, sorted(reasons), signed_activations=True,
                    ranges_cache=ranges_cache)
    library = library_version("nvidia-modelopt" if use_modelopt else "onnxruntime")
    return describe(out_path, "int8-tensorrt", library, method, reasons)
