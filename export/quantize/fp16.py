"""fp16 ONNX for GPU targets: weights and activations in fp16, inputs and outputs in fp32.

Keeping fp32 I/O means the application feeds the same tensors to every precision; the
Casts at the edges cost nothing next to the network.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnxconverter_common import float16

from medkd.toolchain.atomic import atomic_path

from ._common import library_version
from .inspection import QuantizeResult


def convert_fp16(fp32_onnx: Path, out_path: Path) -> QuantizeResult:
    model = onnx.load(str(fp32_onnx))
    with warnings.catch_warnings():
        # It warns once per weight below fp16's smallest normal; the parity check that
        # follows the conversion is what decides whether the fp16 model is good.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    with atomic_path(out_path) as tmp:
        onnx.save(half, str(tmp))
    return QuantizeResult(path=out_path, preset="fp16", library=library_version("onnxconverter-common"))
