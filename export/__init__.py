"""Export: fold, ONNX, quantize, TensorRT engine or on-device bundle, firmware, profiling.

Names are imported on first use (PEP 562), so light tools such as `medkd-profile`, which
only parse JSON, do not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "FoldStats": ".fold", "count_batchnorm": ".fold", "fold_batchnorm": ".fold",
    "fold_batchnorm_with_stats": ".fold",
    "ExportError": ".onnx_export", "export_onnx": ".onnx_export",
    "onnx_parity": ".parity",
    "available_cpus": ".profile", "profile_onnx_cpu": ".profile", "profile_onnx_matrix": ".profile",
    "count_parameters": ".size", "model_file_size_bytes": ".size",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medkd.export' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name], __name__), name)
