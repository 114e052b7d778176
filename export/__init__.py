"""Export slice: fold BatchNorm, export ONNX, check parity, profile ONNX Runtime on CPU."""

from .fold import FoldStats, count_batchnorm, fold_batchnorm, fold_batchnorm_with_stats
from .onnx_export import ExportError, export_onnx
from .parity import onnx_parity
from .profile import available_cpus, profile_onnx_cpu
from .size import count_parameters, model_file_size_bytes

__all__ = [
    "ExportError",
    "FoldStats",
    "available_cpus",
    "count_batchnorm",
    "count_parameters",
    "export_onnx",
    "fold_batchnorm",
    "fold_batchnorm_with_stats",
    "model_file_size_bytes",
    "onnx_parity",
    "profile_onnx_cpu",
]
