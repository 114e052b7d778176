"""The export format table: every artifact medkd can produce, what it needs, who gets it.

One row per format; `exporter.py` has one `export_<name>` function per row. A target's
YAML lists the formats it gets (`formats:`) and its precision; the precision adds the
fp16/int8 ONNX rows. Adding a format = one row here + one function in exporter.py.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from medkd.toolchain.errors import ConfigError

ALL_RUNTIMES = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # file (or folder) written into the run directory, after the model's name
    runtimes: tuple[str, ...]  # target runtimes that can use it
    needs_tensorrt: bool = False
    needs_gpu: bool = False
    needs_calibration: bool = False
    # Written instead when this format's needs are not met on the build host.
    fallback: str | None = None
    description: str = ""


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("onnx", ".onnx", ALL_RUNTIMES, description="fp32 ONNX, BatchNorm folded, dynamic batch"),
        ExportFormat("onnx-fp16", ".fp16.onnx", ("tensorrt",), description="fp16 ONNX with fp32 inputs/outputs"),
        ExportFormat("onnx-int8", ".int8.onnx", ALL_RUNTIMES, needs_calibration=True,
                     description="int8 Q/DQ ONNX in the target's layout, behind the accuracy guard"),
        ExportFormat("tensorrt", ".engine", ("tensorrt",), needs_tensorrt=True, needs_gpu=True, fallback="bundle",
                     description="TensorRT engine for the target GPU"),
        ExportFormat("bundle", "bundle/", ("tensorrt",),
                     description="on-device build bundle: ONNX + trtexec script + manifest"),
        ExportFormat("firmware", "firmware/", ALL_RUNTIMES,
                     description="CRC-checked MKDB container + .S (.incbin) + header + manifest"),
    )
}

PRECISION_FORMAT = {"fp16": "onnx-fp16", "int8": "onnx-int8"}
PRECISIONS = ("fp32", "fp16", "int8", "best")


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_format_names(names, target: dict) -> None:
    for name in names:
        if name not in FORMATS:
            raise ConfigError(
                f"unknown export format '{name}'{suggest(name, FORMATS)}; choose from: {', '.join(FORMATS)}"
            )
        if target["runtime"] not in FORMATS[name].runtimes:
            raise ConfigError(
                f"format '{name}' is not for target {target['name']} ({target['runtime']}); "
                f"it is for {', '.join(FORMATS[name].runtimes)} targets"
            )


def format_table() -> str:
    """The table as text, for `medkd-build --help`."""
    lines = []
    for f in FORMATS.values():
        needs = [n for n, flag in (("TensorRT", f.needs_tensorrt), ("GPU", f.needs_gpu),
                                   ("calibration images", f.needs_calibration)) if flag]
        needs_text = f" (needs {' + '.join(needs)}" + (f"; else {f.fallback})" if f.fallback else ")") if needs else ""
        lines.append(f"  {f.name:<10} {f.suffix:<11} {'/'.join(f.runtimes):<21} {f.description}{needs_text}")
    return "\n".join(lines)
