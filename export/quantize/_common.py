"""Small pieces every quantization mode shares: quiet libraries, input name, version strings."""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx


def library_version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (version unknown)"


def input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


@contextlib.contextmanager
def quiet_libraries():
    """Silence ONNX Runtime's and ModelOpt's per-initializer chatter; medkd logs a summary."""
    import onnxruntime as ort

    loggers = [logging.getLogger(name) for name in ("modelopt", "modelopt.onnx", "root", "")]
    levels = [lg.level for lg in loggers]
    ort.set_default_logger_severity(3)
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        ort.set_default_logger_severity(2)


def ranges_cache_supported() -> bool:
    """Whether this ONNX Runtime's quantize_static can keep calibrated ranges in a file (>= 1.32)."""
    import inspect

    from onnxruntime.quantization import quantize_static
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def ort_qdq(fp32_onnx: Path, out: Path, calibration: np.ndarray, method: str, nodes_to_exclude: list[str],
            *, signed_activations: bool, ranges_cache: Path | None = None) -> None:
    """ONNX Runtime's static QDQ quantizer: per-channel symmetric int8 weights, activations
    symmetric int8 (TensorRT's numerics) or uint8 with a zero point (ORT's CPU kernels).

    ranges_cache: a JSON file of the calibrated tensor ranges, written by the first call and
    read by the next ones (ONNX Runtime >= 1.32; older ones calibrate every time). The ranges
    do not depend on which nodes are excluded, so the accuracy guard's one-quantization-per-unit
    search calibrates once; the caller keys the file by model, images, method and numerics."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from .calibration import CALIBRATION_METHODS, ArrayReader

    ort_method, extra = CALIBRATION_METHODS[method]
    cached = {}
    if ranges_cache is not None and ranges_cache_supported():
        cached = {"calibration_cache_path": str(ranges_cache)}
    quantize_static(
        str(fp32_onnx), str(out), ArrayReader(input_name(fp32_onnx), calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=nodes_to_exclude,
        calibrate_method=ort_method,
        extra_options={"ActivationSymmetric": signed_activations, "WeightSymmetric": True, **extra},
        **cached,
    )
