"""fp16 ONNX for GPU targets: weights and activations in fp16, inputs and outputs in fp32.

Keeping fp32 I/O means the application feeds the same tensors to every precision; the
Casts at the edges cost nothing next to the network. The converter is ONNX Runtime's own
(`onnxruntime.transformers.float16`): onnxconverter-common's left the attention scale's
`Cast(to=float)` in timm ViTs typed as fp16, which ONNX Runtime then refused to load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from medkd.toolchain.atomic import atomic_path
from medkd.toolchain.errors import UserError

from ._common import library_version
from .inspection import QuantizeResult


def convert_fp16(fp32_onnx: Path, out_path: Path) -> QuantizeResult:
    import onnxruntime as ort

    model = onnx.load(str(fp32_onnx))
    with warnings.catch_warnings():
        # It warns once per weight below fp16's smallest normal; the parity check that
        # follows the conversion decides whether the fp16 model is good.
        warnings.simplefilter("ignore", UserWarning)
        half = convert_float_to_float16(model, keep_io_types=True)
    with atomic_path(out_path) as tmp:
        onnx.save(half, str(tmp))
        try:  # a graph ONNX Runtime cannot load must never reach the run directory
            ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"the fp16 conversion of {fp32_onnx.name} does not load in ONNX Runtime: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    return QuantizeResult(path=out_path, preset="fp16", library=library_version("onnxruntime") + " (float16)")
