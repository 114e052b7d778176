"""The exporter: runs the target's formats (see formats.py) for each deployable model.

One `export_<format>` method per row of the format table, each timed and logged by
`run`. Everything is written into a staging folder inside the run directory and moved
into place only when every stage, parity check and profile succeeded: a failed export
leaves the run directory as it was (checkpoint, trained student, any previous export),
and the error propagates as one line.

Decisions (parity, the int8 guard, which precision is deployed) use validation images
carved from the training side. The test split is evaluated once per precision at the end
and only reported.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.errors import UserError
from medkd.toolchain.progress import StageTimer, as_policy

from .evaluate import Metric, compare, onnx_logits
from .firmware import write_firmware_blob
from .fold_stage import fold_for_export
from .formats import FORMATS
from .guard import GuardThresholds, run_guard
from .onnx_export import export_onnx
from .parity import onnx_parity
from .plan import ExportPlan
from .quantize import quantize
from . import bundle as bundle_module
from . import tensorrt as trt_module
from .tensorrt import sha256_file


@dataclass
class Deployable:
    """One model to deploy; `name` is the stem of its files (model.onnx, model.int8.onnx, ...)."""

    name: str
    module: nn.Module
    # Its own images where deployables differ in task (one fused model per task); else the
    # export's shared ExportData is used.
    data: "ExportData | None" = None


@dataclass
class ExportData:
    """Images the exporter needs, all N×C×H×W float32 in the model's input space."""

    calibration: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    metric: Metric
    metric_name: str = "accuracy"
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.validation_images.shape[1:])


def output_name(model: str, fmt: str) -> str:
    """File or folder name of `fmt` for the deployable `model` (folders are shared or per model)."""
    if fmt == "firmware":
        return "firmware"  # one folder; each model is its own symbol medkd_<model>
    if fmt == "bundle":
        return "bundle" if model == "model" else f"bundle-{model}"
    return model + FORMATS[fmt].suffix


def firmware_symbol(model: str) -> str:
    """The C symbol of a deployable's firmware blob: task names like 'fashion-mnist' become
    medkd_fashion_mnist (C identifiers allow only letters, digits and underscores)."""
    return "medkd_" + re.sub(r"\W", "_", model, flags=re.ASCII)


class ModelExporter:
    """Exports one deployable for one target according to a plan."""

    def __init__(self, run_dir: Path, target: dict, export_cfg: dict, plan: ExportPlan,
                 deployable: Deployable, data: ExportData, log=print, progress=None):
        self.run_dir, self.target, self.cfg, self.plan = run_dir, target, export_cfg, plan
        self.deployable, self.data, self.log = deployable, data, log
        self.progress = as_policy(progress)
        self.onnx: dict[str, Path] = {}  # precision -> ONNX file
        self.results: dict[str, dict] = {}  # format -> what it produced
        self.stages = StageTimer(log, prefix=f"export {deployable.name}", digits=2)
        self.deployed_precision: str | None = None
        self.deployed_file: Path | None = None
        self._validation_logits: np.ndarray | None = None

    # ---------------------------------------------------------------- driver

    def run(self) -> dict:
        for name in self.plan.formats:
            # Calibration and engine builds report no progress of their own (the guard has a bar).
            with self.stages(name), self.progress.heartbeat(f"export {self.deployable.name} [{name}]"):
                summary = getattr(self, "export_" + name.replace("-", "_"))()
            self.log(f"export {self.deployable.name} [{name}]: {summary}")
        return self.summary()

    def path_for(self, fmt: str) -> Path:
        return self.run_dir / output_name(self.deployable.name, fmt)

    def validation_logits(self) -> np.ndarray:
        """fp32 ONNX outputs on the validation images: the reference for fp16 and int8."""
        if self._validation_logits is None:
            self._validation_logits = onnx_logits(self.onnx["fp32"], self.data.validation_images)
        return self._validation_logits

    def compare_to_fp32(self, path: Path):
        candidate = onnx_logits(path, self.data.validation_images)
        return compare(self.validation_logits(), candidate, self.data.validation_labels, self.data.metric)

    def _choose(self, precision: str, path: Path) -> None:
        self.deployed_precision, self.deployed_file = precision, path

    # --------------------------------------------------------------- formats

    def export_onnx(self) -> str:
        parity_cfg = self.cfg["parity"]
        sample = torch.from_numpy(self.data.validation_images[:64])
        folded, fold_info = fold_for_export(self.deployable.module, sample, parity_cfg["fp32_max_abs_diff"])
        path = self.path_for("onnx")
        export_onnx(folded, sample[:8], path, opset=self.cfg["opset"])
        parity = onnx_parity(self.deployable.module, path, torch.from_numpy(self.data.validation_images))
        failures = []
        if not parity["max_abs_diff"] <= parity_cfg["fp32_max_abs_diff"]:
            failures.append(f"max abs diff {parity['max_abs_diff']:.3g} > {parity_cfg['fp32_max_abs_diff']:g}")
        if parity["top1_agreement"] < parity_cfg["fp32_min_agreement"]:
            failures.append(f"top-1 agreement {parity['top1_agreement']:.2%} < {parity_cfg['fp32_min_agreement']:.2%}")
        if failures:
            raise UserError(f"fp32 ONNX parity check failed ({'; '.join(failures)}); export files removed")
        self.onnx["fp32"] = path
        self._choose("fp32", path)
        self.results["onnx"] = {"path": path.name, "fold": fold_info, "parity": parity}
        return f"{path.name}, parity max abs diff {parity['max_abs_diff']:.2e}"

    def export_onnx_fp16(self) -> str:
        path = self.path_for("onnx-fp16")
        result = quantize("fp16", self.onnx["fp32"], path)
        comparison = self.compare_to_fp32(path)
        minimum = self.cfg["parity"]["fp16_min_agreement"]
        if comparison.top1_agreement < minimum:
            raise UserError(f"fp16 ONNX parity check failed (top-1 agreement {comparison.top1_agreement:.2%} "
                            f"< {minimum:.2%}); export files removed")
        self.onnx["fp16"] = path
        if self.plan.requested_precision == "fp16" or self.plan.fallback_precision == "fp16":
            self._choose("fp16", path)
        self.results["onnx-fp16"] = {"path": path.name, "library": result.library, "parity": comparison.as_dict()}
        return f"{path.name}, top-1 agreement with fp32 {comparison.top1_agreement:.2%}"

    def export_onnx_int8(self) -> str:
        path = self.path_for("onnx-int8")
        preset = "int8-cpu" if self.target["runtime"] == "onnxruntime" else "int8-tensorrt"
        calibration, method = self.data.calibration, self.cfg["calibration"]["method"]

        thresholds = GuardThresholds(float(self.cfg["max_accuracy_drop"]), self.cfg["parity"]["int8_min_agreement"])
        # One calibration for every candidate the guard tries (same model, images, method).
        with tempfile.TemporaryDirectory(prefix="medkd-ranges-") as ranges:
            def quantize_excluding(exclude):
                return quantize(preset, self.onnx["fp32"], path, calibration, method, exclude,
                                ranges_cache=Path(ranges) / "ranges.json")

            guard = run_guard(quantize_excluding, self.compare_to_fp32, thresholds, log=self.log,
                              progress=self.progress)
        self.results["onnx-int8"] = {"preset": preset, "guard": guard.as_dict(), **guard.result.as_dict(),
                                     "path": path.name if guard.held else None}
        if not guard.held:
            path.unlink(missing_ok=True)
            self.log(f"int8 refused: the accuracy guard does not hold ({'; '.join(guard.first_failure)}) even with "
                     f"layers kept in high precision; deploying {self.deployed_precision}")
            return f"refused by the accuracy guard; {self.deployed_precision} is deployed"
        self.onnx["int8"] = path
        self._choose("int8", path)
        c = guard.comparison
        return (f"{path.name} ({guard.result.library}), validation {self.data.metric_name} drop "
                f"{c.metric_drop_points:.2f} points, agreement {c.top1_agreement:.2%}, "
                f"{len(guard.kept_high_precision)} layer(s) kept in high precision")

    def builder_settings(self, tensorrt_version: str):
        return trt_module.builder_settings(tensorrt_version, self.target, self.deployed_precision,
                                           self.data.input_shape, self.cfg.get("dla_core"))

    def export_tensorrt(self) -> str:
        unavailable = trt_module.tensorrt_available()
        if unavailable is None:
            unavailable = trt_module.gpu_mismatch(self.target)
        if unavailable is not None:
            self.log(f"TensorRT engine not built here ({unavailable}); writing the on-device build bundle instead")
            return self.export_bundle()
        import tensorrt

        settings = self.builder_settings(tensorrt.__version__)
        engine = self.path_for("tensorrt")
        built = trt_module.build_engine_cached(self.deployed_file, settings, engine, Path(self.cfg["engine_cache_dir"]))
        self.results["tensorrt"] = {"path": engine.name, **built}
        self._choose(self.deployed_precision, engine)
        return f"{engine.name} ({settings.precision}, TensorRT {tensorrt.__version__})"

    def export_bundle(self) -> str:
        settings = self.builder_settings(self.target["tensorrt_version"])
        bundle_dir = self.path_for("bundle")
        info = bundle_module.write_bundle(bundle_dir, self.deployed_file, settings, self.manifest_extra())
        self.results["bundle"] = {"path": bundle_dir.name + "/", **info}
        return f"bundle/ for {self.target['name']} ({settings.precision}); run bundle/build_engine.sh on the device"

    def export_firmware(self) -> str:
        kind = "tensorrt-engine" if self.deployed_file.suffix == ".engine" else "onnx"
        manifest = self.path_for("bundle") / "manifest.json"
        if not manifest.exists():
            manifest = self.run_dir / f"{self.deployable.name}.manifest.json"
            atomic_write_text(manifest, json.dumps(self.manifest_extra(), indent=2, sort_keys=True) + "\n")
        out_dir = self.path_for("firmware")
        info = write_firmware_blob(self.deployed_file, out_dir, kind=kind, symbol=firmware_symbol(self.deployable.name),
                                   c_source=bool(self.cfg["firmware_c_source"]), manifest=manifest)
        paths = {k: str(Path(v).relative_to(self.run_dir)) for k, v in info.items()
                 if k in ("bin", "header", "asm", "source", "manifest") and v}
        self.results["firmware"] = {**info, **paths, "payload_file": self.deployed_file.name}
        return f"{Path(info['bin']).name}: {kind} payload ({self.deployed_file.name}), {info['container_size']} bytes"

    # ---------------------------------------------------------------- report

    def manifest_extra(self) -> dict:
        """What a device-side engineer needs to run the deployed model correctly."""
        return {
            "model": self.deployable.name,
            "target": self.target["name"],
            "precision": self.deployed_precision,
            "payload": self.deployed_file.name,
            "payload_sha256": sha256_file(self.deployed_file),
            "input_shape": ["batch", *self.data.input_shape],
            "preprocessing": self.data.preprocessing,
            "class_names": list(self.data.class_names),
            "metric": self.data.metric_name,
            "expected_validation_metric": self.validation_metric_by_precision(),
        }

    def validation_metric_by_precision(self) -> dict[str, float]:
        out = {"fp32": self.data.metric(self.validation_logits(), self.data.validation_labels)}
        for precision, path in self.onnx.items():
            if precision != "fp32":
                out[precision] = self.data.metric(onnx_logits(path, self.data.validation_images), self.data.validation_labels)
        return out

    def test_metric_by_precision(self) -> dict[str, float]:
        """Measured once, after every decision was made; reported, never used to choose."""
        return {p: self.data.metric(onnx_logits(path, self.data.test_images), self.data.test_labels)
                for p, path in self.onnx.items()}

    def summary(self) -> dict:
        return {
            "name": self.deployable.name,
            "requested_precision": self.plan.requested_precision,
            "deployed_precision": self.deployed_precision,
            "deployed_file": self.deployed_file.name,
            "onnx": {p: {"path": path.name, "size_bytes": path.stat().st_size} for p, path in self.onnx.items()},
            "test_metric": self.test_metric_by_precision(),
            "validation_images": len(self.data.validation_labels),
            "calibration_images": len(self.data.calibration),
            "formats": self.results,
            "stage_seconds": self.stages.seconds,
        }
