"""Export a student to a single, self-contained ONNX file with a dynamic batch dimension.

Exporter choice (torch 2.14)
----------------------------
The default is the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``
with ``dynamic_axes``). Measured on the timm students (resnet18, mobilenetv3_small_100,
tiny ViT) in this environment:

* it honours the requested opset exactly (17 in the default config), while the
  ``torch.export``-based exporter (``dynamo=True``) only has opset >= 18
  implementations and its down-conversion to 17 fails for the CNNs (``ReduceMean``
  axes adapter) — it then *silently* keeps opset 18;
* it takes ~1 s per model instead of ~4-5 s;
* a batch-1 sample is fine (``torch.export`` specialises size-1 dims, so a dynamic
  batch needs a sample with batch >= 2 there).

It is deprecated upstream ("will be removed"), so ``exporter="dynamo"`` is also
supported: there the batch dimension is declared via ``dynamic_shapes``, a batch-1
sample is repeated to batch 2, weights are embedded (``external_data=False``), and the
exported opset is checked against the request (mismatch -> :class:`UserError`).

Whatever the exporter, the file at ``path`` only appears once it is known good: the
export goes to a private temp folder next to ``path``; any external-data side files are
inlined into the one ``.onnx`` file; ``onnx.checker.check_model`` runs; onnxruntime
loads it and runs it at two batch sizes (catches a batch size baked into the graph);
then ``os.replace`` moves it into place. On any failure the temp folder is removed and
nothing is left at ``path`` (an existing file there is left untouched).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from medkd.toolchain.errors import UserError

__all__ = ["export_onnx", "ExportError"]

_TWO_GIB = 2 * 1024**3


class ExportError(RuntimeError):
    """The model could not be exported / the exported graph failed verification."""


class _EvalMode:
    """Put a module tree in eval mode and restore every submodule's own flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag


def _export_torchscript(model, sample, path, opset, input_name, output_name) -> None:
    with warnings.catch_warnings():
        # We chose the legacy exporter on purpose (see module docstring).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
            dynamo=False,
        )


def _export_dynamo(model, sample, path, opset, input_name, output_name) -> None:
    if sample.shape[0] == 1:  # torch.export specialises size-1 dims: trace with batch 2
        sample = sample.repeat(2, *([1] * (sample.dim() - 1)))
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (sample,),
        input_names=[input_name],
        output_names=[output_name],
        opset_version=opset,
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def _inline_external_data(onnx_file: Path) -> onnx.ModelProto:
    """Load the model with any external tensors and re-save it as one file if needed."""
    proto = onnx.load(str(onnx_file), load_external_data=True)
    side_files = [p for p in onnx_file.parent.iterdir() if p != onnx_file]
    if side_files:
        if proto.ByteSize() >= _TWO_GIB:
            raise UserError(
                f"model is {proto.ByteSize() / 1024**3:.1f} GiB: too large for a single-file ONNX export"
            )
        for tensor in _all_initializers(proto):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        onnx.save(proto, str(onnx_file))
        for p in side_files:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    return proto


def _all_initializers(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def _verify(onnx_file: Path, proto: onnx.ModelProto, sample: torch.Tensor, input_name: str) -> None:
    onnx.checker.check_model(proto, full_check=True)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ExportError(f"exported input batch dimension is static ({batch_dim.dim_value}), expected dynamic")

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x = rng.standard_normal((n, *sample.shape[1:])).astype(np.float32)
        out = sess.run(None, {input_name: x})[0]
        if out.shape[0] != n:
            raise ExportError(f"ONNX model returned batch {out.shape[0]} for an input of batch {n}")


def export_onnx(
    model: nn.Module,
    sample_input: torch.Tensor,
    path: str | os.PathLike,
    opset: int = 17,
    input_name: str = "images",
    output_name: str = "logits",
    *,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
) -> Path:
    """Export `model` (in eval mode) to the single ONNX file `path`; return its Path.

    `sample_input` is one float tensor N×C×H×W; dims other than the batch are fixed in
    the graph. The batch dimension is dynamic (named ``batch``). The write is atomic:
    on failure nothing is created at `path`. The model's train/eval flags are restored.
    """
    if not isinstance(sample_input, torch.Tensor) or sample_input.dim() < 1:
        raise UserError("sample_input must be a tensor with a leading batch dimension")
    if exporter not in ("torchscript", "dynamo"):
        raise UserError(f"unknown ONNX exporter {exporter!r}; use 'torchscript' or 'dynamo'")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"ONNX output path {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = sample_input.detach()

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_file = tmp_dir / path.name
        export = _export_torchscript if exporter == "torchscript" else _export_dynamo
        with _EvalMode(model), torch.no_grad():
            export(model, sample, tmp_file, opset, input_name, output_name)
        proto = _inline_external_data(tmp_file)
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            raise UserError(
                f"the {exporter} exporter produced ONNX opset {got}, not the requested {opset}"
                + ("; use opset>=18 or exporter='torchscript'" if exporter == "dynamo" else "")
            )
        _verify(tmp_file, proto, sample, input_name)
        os.replace(tmp_file, path)
    except (UserError, ExportError):
        raise
    except Exception as e:  # exporter/checker/runtime failures: keep the cause chained
        raise ExportError(f"ONNX export to {path} failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
