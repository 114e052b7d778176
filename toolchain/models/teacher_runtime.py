"""Teacher features through ONNX Runtime: the frozen extractor is exported to ONNX once and run there.

    extractor = runtime_extractor(recipe.feature_extractor(teacher), "onnxruntime", "fp32",
                                  cache_dir, calibration_images=train_images)
    feats = teacher_features(extractor, images, cache_dir)       # medkd.toolchain.features

Any frozen feature module works (a teacher from teachers.py or a recipe's own extractor):
it needs `fingerprint`, `feature_dim` and forward(images N x C x H x W in [0, 1]) -> N x D.
The result has the same interface and no parameters (so the feature loop feeds it CPU
tensors); its `fingerprint` adds the backend and precision (and, for int8, a digest of
the calibration images), so the content-keyed feature cache never mixes torch, ONNX
Runtime fp32 and int8 features. backend="torch" returns the extractor unchanged.

What the graph holds: where the extractor splits into `preprocess` (channel expand,
resize, normalisation: cheap) and `extract` (the network), as every FrozenTeacher does,
the preprocessing stays in PyTorch and only `extract` is exported. Its input then has the
teacher's fixed size whatever the data's size, and antialiased downsizing, which the ONNX
exporter cannot express, never enters the graph. Any other extractor is exported whole.
Batch is dynamic; the other input dims are fixed per graph, one graph per input shape.

Cache: `cache_dir/teacher-onnx/<fingerprint>-<C>x<H>x<W>-opset<N>-<fp32|int8[-cal<digest>]>.onnx`,
each written atomically (export_onnx checks the graph with ONNX Runtime at two batch sizes
before it is moved into place; quantize() writes through medkd.toolchain.atomic). A file
ONNX Runtime cannot open, or whose input/output shapes are wrong, is rebuilt with a warning.
Without a cache_dir the graphs live in a temporary folder for the module's lifetime.

int8: the export stage's quantizer (`quantize("int8-cpu", ...)`: per-channel int8 weights,
uint8 activations, MinMax calibration; the last weighted layer stays fp32) calibrated on up
to `calibration_count` evenly spaced images of `calibration_images`. ONNX Runtime's
calibrator keeps every activation of every calibration image in memory, so the default
count shrinks with the graph's input size: 256 images at 3 x 56 x 56, 12 at 3 x 256 x 256.

Why fp32 is the configured default: ONNX Runtime fp32 reproduces the PyTorch features and is
faster than PyTorch eager, while int8 falls far short of the bar for keeping the
features (linear CKA >= 0.99 against fp32); bench/teacher.py measures both, its results are in
bench/results/teacher.json and the README.

ONNX Runtime runs on `threads` intra-op threads (default torch.get_num_threads(), which the
build sets from the config's `threads`). Its idle worker threads sleep rather than spin
(spin=True restores ONNX Runtime's default): the build machines are shared, and
bench/teacher.py times both.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import check_teacher_runtime
from ..errors import UserError
from ..features import images_digest

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "features"
# Default int8 calibration: 256 images of LiteMedSAM's default 3 x 56 x 56 input, fewer
# (never below 8) for larger inputs, whose activations the calibrator holds all at once.
CALIBRATION_COUNT = 256
CALIBRATION_VALUES = CALIBRATION_COUNT * 3 * 56 * 56
MIN_CALIBRATION_COUNT = 8
ONNX_SUBDIR = "teacher-onnx"


def runtime_extractor(
    extractor: nn.Module,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    calibration_images: torch.Tensor | None = None,
    *,
    calibration_count: int | None = None,
    threads: int | None = None,
    spin: bool = False,
    opset: int = OPSET,
) -> nn.Module:
    """`extractor` run by `backend` at `precision` (same interface); see the module docstring.

    calibration_images: raw images (as the extractor takes them) for int8 calibration;
    needed, and only used, when precision="int8".
    """
    check_teacher_runtime(backend, precision)
    if backend == "torch":
        return extractor
    if precision == "int8" and (calibration_images is None or len(calibration_images) == 0):
        raise UserError("teacher.precision=int8 needs calibration images (the training images)")
    return OnnxRuntimeExtractor(extractor, precision, cache_dir, calibration_images,
                                calibration_count=calibration_count, threads=threads, spin=spin, opset=opset)


class _Extract(nn.Module):
    """The network part of a teacher that preprocesses separately: what gets exported."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.extract(x)


def _split(extractor: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """(preprocessing run in PyTorch, module exported to ONNX)."""
    if callable(getattr(extractor, "preprocess", None)) and callable(getattr(extractor, "extract", None)):
        return extractor.preprocess, _Extract(extractor)
    return (lambda images: images.float()), extractor


def calibration_subset(images: torch.Tensor, count: int) -> torch.Tensor:
    """Up to `count` evenly spaced images: every class and region of an ordered set, deterministically."""
    if len(images) <= count:
        return images
    return images[torch.linspace(0, len(images) - 1, count).round().long()]


class OnnxRuntimeExtractor(nn.Module):
    """A frozen feature extractor whose network runs in an ONNX Runtime session."""

    def __init__(self, extractor: nn.Module, precision: str, cache_dir, calibration_images=None, *,
                 calibration_count: int | None = None, threads: int | None = None, spin: bool = False,
                 opset: int = OPSET):
        super().__init__()
        self.feature_dim = int(extractor.feature_dim)
        self.precision = precision
        self.opset = int(opset)
        self.threads = threads
        self.spin = spin
        self._preprocess, exported = _split(extractor)
        # Plain attributes, not submodules: this module has no parameters, so callers treat it
        # as the CPU-only module it is, and the torch weights are only touched to export.
        object.__setattr__(self, "_exported", exported)
        self._calibration = None
        suffix = precision
        if precision == "int8":
            if calibration_count is None:
                per_image = self._preprocess(calibration_images[:1]).numel()
                calibration_count = max(MIN_CALIBRATION_COUNT, min(CALIBRATION_COUNT, CALIBRATION_VALUES // per_image))
            self._calibration = calibration_subset(calibration_images, calibration_count)
            suffix += f"-cal{images_digest(self._calibration)[:12]}"
        self.calibration_count = 0 if self._calibration is None else len(self._calibration)
        self.fingerprint = f"{extractor.fingerprint}-ort-{suffix}"
        self._suffix = suffix
        self._base_fingerprint = extractor.fingerprint
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="medkd-teacher-onnx-")
            self.onnx_dir = Path(self._tmp.name)
        else:
            self.onnx_dir = Path(cache_dir) / ONNX_SUBDIR
        self._sessions: dict[tuple[int, ...], object] = {}
        # One-off costs of the graphs built by this module (seconds), for benchmarks and logs.
        self.build_seconds: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"fingerprint={self.fingerprint}, feature_dim={self.feature_dim}"

    # -- files ----------------------------------------------------------------------------

    def onnx_path(self, shape: tuple[int, ...], fp32: bool = False) -> Path:
        """The cached graph for inputs N x `shape` (the preprocessed shape); fp32=True: the
        fp32 graph an int8 one is quantized from."""
        dims = "x".join(str(d) for d in shape)
        suffix = "fp32" if fp32 else self._suffix
        return self.onnx_dir / f"{self._base_fingerprint}-{dims}-opset{self.opset}-{suffix}.onnx"

    def _export_fp32(self, shape: tuple[int, ...]) -> Path:
        from medkd.export.onnx_export import ExportError, export_onnx

        path = self.onnx_path(shape, fp32=True)
        if self._open(path, shape, warn=False) is None:
            exported = self._exported
            device = next(exported.parameters(), torch.empty(0)).device
            # A sample from its own generator: the global RNG (student init, shuffling) must not
            # depend on whether this graph was already cached.
            sample = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
            started = time.perf_counter()
            with warnings.catch_warnings():
                # Python-level shape checks in the teacher are constants for a fixed input shape.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message="Constant folding")  # exporter's own note
                try:
                    export_onnx(exported, sample, path, self.opset, INPUT_NAME, OUTPUT_NAME)
                except ExportError as exc:  # an op ONNX lacks: only the torch backend can run it
                    raise UserError(f"the teacher features cannot run in ONNX Runtime ({str(exc).splitlines()[0]}); "
                                    "use teacher.backend=torch") from None
            self.build_seconds["export"] = time.perf_counter() - started
        return path

    def _quantize(self, shape: tuple[int, ...], fp32_path: Path, path: Path) -> None:
        from medkd.export.quantize import quantize

        calibration = self._preprocess(self._calibration).float()
        if tuple(calibration.shape[1:]) != shape:
            raise UserError(
                f"int8 teacher features for images of shape {shape} need calibration images of that shape, "
                f"got {tuple(calibration.shape[1:])}"
            )
        started = time.perf_counter()
        quantize("int8-cpu", fp32_path, path, calibration=calibration.cpu().numpy())
        self.build_seconds["quantize"] = time.perf_counter() - started

    # -- sessions -------------------------------------------------------------------------

    def _session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(self.threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        if not self.spin:  # idle workers sleep instead of busy-waiting on a CPU others share
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return options

    def _open(self, path: Path, shape: tuple[int, ...], warn: bool = True):
        """A session on `path`, or None (with a warning when the file exists but is unusable)."""
        if not path.is_file():
            return None
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), self._session_options(), providers=["CPUExecutionProvider"])
            got_in = list(session.get_inputs()[0].shape[1:])
            got_out = session.get_outputs()[0].shape[-1]
            if got_in != list(shape) or got_out != self.feature_dim:
                raise ValueError(f"graph takes N x {got_in} -> {got_out}, expected N x {list(shape)} -> "
                                 f"{self.feature_dim}")
        except Exception as exc:  # truncated or foreign file: rebuild it
            if warn:
                warnings.warn(f"cached teacher ONNX {path} is unusable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); rebuilding it",
                              RuntimeWarning, stacklevel=4)
            return None
        return session

    def session(self, shape: tuple[int, ...]):
        """The session for preprocessed inputs N x `shape`: cached graph, else exported (and quantized) now."""
        shape = tuple(int(d) for d in shape)
        if shape not in self._sessions:
            path = self.onnx_path(shape)
            session = self._open(path, shape)
            if session is None:
                fp32_path = self._export_fp32(shape)
                if self.precision == "int8":
                    self._quantize(shape, fp32_path, path)
                session = self._open(path, shape)
                if session is None:
                    raise RuntimeError(f"ONNX Runtime cannot open the teacher graph it just wrote: {path}")
            self._sessions[shape] = session
        return self._sessions[shape]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._preprocess(images).detach().to("cpu", torch.float32).contiguous()
        if x.ndim != 4:
            raise UserError(f"teacher features need images N x C x H x W, got shape {tuple(images.shape)}")
        out = self.session(tuple(x.shape[1:])).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
