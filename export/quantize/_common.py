"""Small pieces every quantization mode shares: quiet libraries, input name, version strings."""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from pathlib import Path

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
