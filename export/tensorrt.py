"""TensorRT engines: how to build one for a target, where to cache it, and the build itself.

`builder_settings` turns (TensorRT version, target config, precision, input shape, DLA
core) into a frozen `BuilderSettings`: a pure function, no TensorRT import, no I/O.
Everything downstream (the cache key, the trtexec command lines, the Python API build, the
on-device bundle in `medkd.export.bundle`) reads only those settings, so an engine is
always built the way the settings say.

Precision rules (the ONNX already carries the precision; TensorRT must not re-decide it):

=========  ==========================================  ===================================
precision  ONNX shipped                                TensorRT 10 / TensorRT 11
=========  ==========================================  ===================================
int8       explicit Q/DQ, unquantized layers in fp16   strongly typed / strongly typed
fp16       fp16 weights and activations, fp32 I/O      ``FP16`` builder flag / strongly typed
fp32       fp32                                        no flags / strongly typed
=========  ==========================================  ===================================

TensorRT 11 removed the precision builder flags (every network is strongly typed); on
TensorRT 10 an int8 Q/DQ network must be strongly typed so TensorRT keeps the ONNX's types.

DLA (``dla_core``): only on targets with DLA cores, not on TensorRT 11.0-11.3 (DLA is absent
there), fp16/int8 only, static shapes (min = opt = max = the target's opt batch) and GPU
fallback for layers DLA cannot run. trtexec cannot combine CUDA graphs with DLA.

Engines are not portable across GPU model, TensorRT version or JetPack release:
`engine_cache_key` folds all of them (plus the settings and the ONNX's sha256) into the
cache key, so a cached engine is only ever reused on the device kind that built it.

`build_engine` needs the ``tensorrt`` package and a CUDA GPU (`tensorrt_available` says
why not); `build_engine_cached` goes through the engine cache, and `gpu_mismatch` says
whether an engine built on this machine would run on a target's devices at all.

The code between the "self-contained" markers below uses only the standard library and
the ``tensorrt`` module it is handed: `standalone_build_source` returns it, so the
bundle's ``build_engine.py`` runs the very same code on a device without medkd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkd.toolchain.atomic import atomic_save
from medkd.toolchain.errors import UserError

__all__ = [
    "BuilderSettings",
    "PRECISIONS",
    "TensorRTBuildError",
    "build_engine",
    "build_engine_cached",
    "builder_settings",
    "check_onnx_precision",
    "engine_cache_key",
    "engine_cache_path",
    "gpu_mismatch",
    "local_compute_capability",
    "local_l4t_release",
    "onnx_precision_evidence",
    "parse_tensorrt_version",
    "profile_output_names",
    "standalone_build_source",
    "tensorrt_available",
    "trtexec_build_command",
    "trtexec_profile_command",
]

PRECISIONS = ("fp32", "fp16", "int8")
SUPPORTED_MAJORS = (10, 11)
# TensorRT 11.0-11.3 shipped without DLA (NVIDIA "Working with DLA", 11.x docs).
_NO_DLA = ((11, 0), (11, 3))
# Jetson memory is shared with the CPU: a bounded workspace keeps a build from starving it.
DEFAULT_WORKSPACE_MIB = 1024
_CACHE_KEY_SCHEMA = 1
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class BuilderSettings:
    """Everything that decides how an engine is built (and so belongs in its cache key)."""

    tensorrt_version: str  # "major.minor"
    target: str
    precision: str  # fp32 | fp16 | int8
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # tensorrt.BuilderFlag member names, e.g. ("FP16",)
    min_batch: int
    opt_batch: int
    max_batch: int
    input_shape: tuple[int, int, int]  # C, H, W
    dla_core: int | None = None
    gpu_fallback: bool = False
    timing_cache: bool = True
    workspace_mib: int = DEFAULT_WORKSPACE_MIB

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, *self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples become lists); `build_engine.py` reads this back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------------------
# Pure rules: version, target, precision, DLA -> BuilderSettings
# --------------------------------------------------------------------------------------


def parse_tensorrt_version(version: str) -> tuple[int, int]:
    """``"10.3"`` / ``"11.4.0.106"`` / ``" 10.3.0 "`` -> (major, minor)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", str(version))
    if not match:
        raise UserError(f"cannot read TensorRT version {version!r}: expected major.minor, e.g. 10.3 or 11.4.0.106")
    return int(match.group(1)), int(match.group(2))


def _target_field(target: Mapping, key: str) -> Any:
    if key not in target:
        raise UserError(f"target config {target.get('name', '?')!r} has no {key!r} field")
    return target[key]


def _check_tensorrt_target(target: Mapping) -> str:
    name = str(_target_field(target, "name"))
    runtime = _target_field(target, "runtime")
    if runtime != "tensorrt":
        raise UserError(f"target {name} runs {runtime}, not TensorRT: there is no engine to build for it")
    return name


def _check_precision(name: str, target: Mapping, precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(
            f"engine precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            + (" (resolve 'best' before building the engine)" if precision == "best" else "")
        )
    allowed = list(_target_field(target, "precisions"))
    if precision not in allowed:
        raise UserError(f"target {name} does not support precision {precision} (supported: {', '.join(allowed)})")


def _check_version(version: tuple[int, int]) -> None:
    if version[0] not in SUPPORTED_MAJORS:
        raise UserError(
            f"TensorRT {version[0]}.{version[1]} is not supported: medkd builds engines with TensorRT "
            + " or ".join(str(m) for m in SUPPORTED_MAJORS)
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _batch_profile(name: str, target: Mapping) -> tuple[int, int, int]:
    batch = _target_field(target, "batch")
    try:
        lo, opt, hi = batch["min"], batch["opt"], batch["max"]
    except (KeyError, TypeError):
        raise UserError(f"target {name}: batch must be a mapping with min, opt and max") from None
    if not all(_positive_int(b) for b in (lo, opt, hi)) or not lo <= opt <= hi:
        raise UserError(f"target {name}: batch needs positive integers with min <= opt <= max, got {dict(batch)}")
    return lo, opt, hi


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if len(shape) != 3 or not all(_positive_int(d) for d in shape):
        raise UserError(f"engine input shape must be three positive integers (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _check_dla(name: str, target: Mapping, version: tuple[int, int], precision: str, dla_core: Any) -> int:
    cores = int(_target_field(target, "dla_cores") or 0)
    if cores == 0:
        raise UserError(f"{name} has no DLA")
    if not isinstance(dla_core, int) or isinstance(dla_core, bool) or not 0 <= dla_core < cores:
        raise UserError(f"{name} has {cores} DLA cores (0-{cores - 1}); dla_core={dla_core!r} does not exist")
    if _NO_DLA[0] <= version <= _NO_DLA[1]:
        raise UserError(
            f"TensorRT {version[0]}.{version[1]} has no DLA support (absent in TensorRT 11.0-11.3); "
            "build for the GPU (no dla_core) or use TensorRT 10 or 11.4+"
        )
    if precision == "fp32":
        raise UserError("DLA runs fp16 or int8 only; choose precision fp16 or int8 for a DLA engine")
    return dla_core


def _precision_mode(major: int, precision: str) -> tuple[bool, tuple[str, ...]]:
    """(strongly_typed, builder_flags) for a precision on a TensorRT major version."""
    if major >= 11 or precision == "int8":
        # 11 has no precision flags; an int8 Q/DQ graph must keep its own types on 10 too.
        return True, ()
    if precision == "fp16":
        return False, ("FP16",)
    return False, ()


def builder_settings(
    tensorrt_version: str,
    target: Mapping,
    precision: str,
    input_shape: tuple[int, int, int],
    dla_core: int | None = None,
    *,
    timing_cache: bool = True,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
) -> BuilderSettings:
    """How to build an engine of `precision` for `target` with TensorRT `tensorrt_version`.

    Pure: reads only its arguments. Raises `UserError` for a non-TensorRT target, an
    unsupported precision or TensorRT version, an impossible DLA request or a bad shape.
    """
    name = _check_tensorrt_target(target)
    _check_precision(name, target, precision)
    version = parse_tensorrt_version(tensorrt_version)
    _check_version(version)
    shape = _check_input_shape(input_shape)
    lo, opt, hi = _batch_profile(name, target)
    if not _positive_int(workspace_mib):
        raise UserError(f"TensorRT workspace must be a positive number of MiB, got {workspace_mib!r}")
    strongly_typed, flags = _precision_mode(version[0], precision)
    if dla_core is not None:
        dla_core = _check_dla(name, target, version, precision, dla_core)
        lo = hi = opt  # DLA has no dynamic dimensions
    return BuilderSettings(
        tensorrt_version=f"{version[0]}.{version[1]}",
        target=name,
        precision=precision,
        strongly_typed=strongly_typed,
        builder_flags=flags,
        min_batch=lo,
        opt_batch=opt,
        max_batch=hi,
        input_shape=shape,
        dla_core=dla_core,
        gpu_fallback=dla_core is not None,
        timing_cache=bool(timing_cache),
        workspace_mib=workspace_mib,
    )


# --------------------------------------------------------------------------------------
# Engine cache
# --------------------------------------------------------------------------------------


def engine_cache_key(
    settings: BuilderSettings,
    onnx_sha256: str,
    compute_capability: str,
    l4t_release: str | None,
    *,
    tensorrt_full_version: str | None = None,
) -> str:
    """Hex sha256 naming the engine built from this ONNX with these settings on this device kind.

    `compute_capability` is the GPU's (e.g. ``"8.7"``), `l4t_release` the Jetson Linux
    release (e.g. ``"36.4.3"``; None off Jetson). Pass `tensorrt_full_version` (e.g.
    ``"10.3.0.30"``) when known: engines do not load across TensorRT patch releases either.
    """
    onnx_sha256 = str(onnx_sha256).lower()
    if not _HEX64.match(onnx_sha256):
        raise UserError(f"ONNX sha256 must be 64 hex digits, got {onnx_sha256!r}")
    if not re.fullmatch(r"\d+\.\d+", str(compute_capability)):
        raise UserError(f"GPU compute capability must look like 8.7, got {compute_capability!r}")
    if l4t_release is not None and not str(l4t_release).strip():
        raise UserError("L4T release must be a non-empty string or None")
    if tensorrt_full_version is not None:
        full = parse_tensorrt_version(tensorrt_full_version)
        if f"{full[0]}.{full[1]}" != settings.tensorrt_version:
            raise UserError(
                f"TensorRT {tensorrt_full_version} does not match the settings' TensorRT {settings.tensorrt_version}"
            )
    payload = {
        "schema": _CACHE_KEY_SCHEMA,
        "settings": settings.to_dict(),
        "onnx_sha256": onnx_sha256,
        "compute_capability": str(compute_capability),
        "l4t_release": None if l4t_release is None else str(l4t_release).strip(),
        "tensorrt_full_version": None if tensorrt_full_version is None else str(tensorrt_full_version).strip(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """Where the engine for `key` lives in `cache_dir` (nothing is created)."""
    if not isinstance(key, str) or not _HEX64.match(key):
        raise UserError(f"engine cache key must be 64 lowercase hex digits, got {key!r}")
    return Path(cache_dir) / f"{key}.engine"


# --------------------------------------------------------------------------------------
# trtexec command lines
# --------------------------------------------------------------------------------------


def _shape_spec(input_name: str, shape: tuple[int, ...]) -> str:
    # trtexec splits shape lists on ',' and name from dims on the last ':'; quotes protect a ':'.
    if not input_name or "," in input_name or "'" in input_name or any(c.isspace() for c in input_name):
        raise UserError(f"input name {input_name!r} cannot be passed to trtexec (no commas, quotes or spaces)")
    name = f"'{input_name}'" if ":" in input_name else input_name
    return f"{name}:{'x'.join(str(d) for d in shape)}"


def _dla_flags(settings: BuilderSettings, build: bool) -> list[str]:
    if settings.dla_core is None:
        return []
    flags = [f"--useDLACore={settings.dla_core}"]
    if build and settings.gpu_fallback:
        flags.append("--allowGPUFallback")
    return flags


def _precision_flags(settings: BuilderSettings) -> list[str]:
    if settings.strongly_typed:
        return ["--stronglyTyped"]
    known = {"FP16": "--fp16"}
    unknown = [f for f in settings.builder_flags if f not in known]
    if unknown:
        raise UserError(f"no trtexec flag for builder flag(s) {', '.join(unknown)}")
    return [known[f] for f in settings.builder_flags]


def trtexec_build_command(
    settings: BuilderSettings,
    onnx_name: str,
    engine_name: str,
    timing_cache_name: str | None,
    *,
    input_name: str = "images",
) -> list[str]:
    """The trtexec argv that builds `engine_name` from `onnx_name` exactly as `settings` say."""
    cmd = [
        "trtexec",
        f"--onnx={onnx_name}",
        f"--saveEngine={engine_name}",
        f"--minShapes={_shape_spec(input_name, settings.shape(settings.min_batch))}",
        f"--optShapes={_shape_spec(input_name, settings.shape(settings.opt_batch))}",
        f"--maxShapes={_shape_spec(input_name, settings.shape(settings.max_batch))}",
        *_precision_flags(settings),
        f"--memPoolSize=workspace:{settings.workspace_mib}M",
    ]
    if settings.timing_cache:
        if not timing_cache_name:
            raise ValueError("settings.timing_cache is on: pass a timing cache file name")
        cmd.append(f"--timingCacheFile={timing_cache_name}")
    cmd += _dla_flags(settings, build=True)
    # Layer details are recorded at build time; the profiling run can only export what is there.
    cmd += ["--profilingVerbosity=detailed", "--skipInference"]
    return cmd


def profile_output_names(out_prefix: str) -> dict[str, str]:
    return {
        "times": f"{out_prefix}.times.json",
        "profile": f"{out_prefix}.profile.json",
        "layers": f"{out_prefix}.layers.json",
    }


def trtexec_profile_command(
    settings: BuilderSettings, engine_name: str, out_prefix: str, *, input_name: str = "images"
) -> list[str]:
    """The trtexec argv that times `engine_name` at the opt batch and exports its JSON reports."""
    out = profile_output_names(out_prefix)
    shapes = _shape_spec(input_name, settings.shape(settings.opt_batch))
    cmd = ["trtexec", f"--loadEngine={engine_name}", f"--shapes={shapes}"]
    cmd += _dla_flags(settings, build=False)
    if settings.dla_core is None:  # CUDA graphs and DLA offloading cannot be combined
        cmd.append("--useCudaGraph")
    cmd += [
        "--noDataTransfers",
        "--useSpinWait",
        "--separateProfileRun",
        "--percentile=50,90,99",
        "--profilingVerbosity=detailed",
        f"--exportTimes={out['times']}",
        f"--exportProfile={out['profile']}",
        f"--exportLayerInfo={out['layers']}",
    ]
    return cmd


# --------------------------------------------------------------------------------------
# What precision an ONNX file actually carries
# --------------------------------------------------------------------------------------


def onnx_precision_evidence(model) -> dict[str, int]:
    """Count Q/DQ nodes and fp16 tensors (initializers and casts to fp16) in an ONNX ModelProto."""
    import onnx

    fp16 = onnx.TensorProto.FLOAT16
    nodes = list(model.graph.node)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)
    fp16_tensors = sum(t.data_type == fp16 for t in model.graph.initializer)
    fp16_tensors += sum(
        n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in nodes
    )
    return {"qdq_nodes": int(qdq), "fp16_tensors": int(fp16_tensors)}


def check_onnx_precision(model, precision: str, label: str = "the ONNX model") -> dict[str, int]:
    """Refuse an ONNX whose contents do not match `precision` (TensorRT would silently differ)."""
    ev = onnx_precision_evidence(model)
    if precision == "int8" and not ev["qdq_nodes"]:
        raise UserError(
            f"precision int8 needs an explicit Q/DQ ONNX; {label} has no QuantizeLinear/DequantizeLinear nodes "
            "(quantize it with the int8-tensorrt preset first)"
        )
    if precision in ("fp16", "fp32") and ev["qdq_nodes"]:
        raise UserError(f"precision {precision} needs an ONNX without Q/DQ nodes; {label} is quantized (use int8)")
    if precision == "fp16" and not ev["fp16_tensors"]:
        raise UserError(
            f"precision fp16 needs the fp16 ONNX; {label} has no fp16 tensors (convert it with the fp16 preset)"
        )
    if precision == "fp32" and ev["fp16_tensors"]:
        raise UserError(f"precision fp32 needs the fp32 ONNX; {label} holds fp16 tensors")
    return ev


# --------------------------------------------------------------------------------------
# Building with the TensorRT Python API
# --------------------------------------------------------------------------------------


def tensorrt_available() -> str | None:
    """None when an engine can be built here, else why not (one line)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken/placeholder install failing to load its libraries
        return "tensorrt is not installed" + ("" if isinstance(e, ModuleNotFoundError) else f" ({e})")
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        return "tensorrt is installed without the builder and ONNX parser (lean runtime only)"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # TensorRT raises when CUDA cannot initialise
        return f"no CUDA GPU (TensorRT could not create a builder: {e})"
    return None if builder is not None else "no CUDA GPU"


# ---- self-contained: standard library + the `trt` module passed in; copied into bundles ----


class TensorRTBuildError(RuntimeError):
    """The ONNX could not be parsed, or TensorRT could not build an engine from it."""


def check_tensorrt_version(trt, s):
    """Refuse settings meant for another TensorRT major version (flags and typing differ)."""
    installed = str(trt.__version__)
    want_major = str(s["tensorrt_version"]).split(".")[0]
    if installed.split(".")[0] != want_major:
        raise TensorRTBuildError(
            "the build settings are for TensorRT %s but TensorRT %s is installed" % (s["tensorrt_version"], installed)
        )
    return installed


def network_creation_flags(trt, s):
    if not s["strongly_typed"]:
        return 0
    # Deprecated (always on) in TensorRT 11 but still accepted; required on TensorRT 10.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def parse_onnx(parser, onnx_path):
    # parse_from_file (not parse) so the parser resolves paths relative to the model file.
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [str(parser.get_error(i)).strip().replace("\n", " ") for i in range(parser.num_errors)]
    raise TensorRTBuildError(
        "TensorRT could not parse %s: %s" % (onnx_path, "; ".join(errors) or "no parser error reported")
    )


def dynamic_batch_profile(builder, network, s):
    """One optimization profile over the batch dimension of the single image input."""
    if network.num_inputs != 1:
        raise TensorRTBuildError("expected one image input, the network has %d inputs" % network.num_inputs)
    tensor = network.get_input(0)
    dims = tuple(int(d) for d in tensor.shape)
    want = tuple(int(d) for d in s["input_shape"])
    if len(dims) != 4 or dims[1:] != want:
        raise TensorRTBuildError("input %r has shape %s, the settings expect N x %s" % (tensor.name, dims, want))
    lo, opt, hi = s["min_batch"], s["opt_batch"], s["max_batch"]
    if dims[0] != -1 and not lo == opt == hi == dims[0]:
        raise TensorRTBuildError(
            "input %r has a static batch of %d; export the ONNX with a dynamic batch" % (tensor.name, dims[0])
        )
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, (lo, *want), (opt, *want), (hi, *want))
    return tensor.name, profile


def configure_builder(trt, builder, network, config, s):
    """Apply the settings to a builder config: profile, precision flags, DLA, workspace."""
    input_name, profile = dynamic_batch_profile(builder, network, s)
    config.add_optimization_profile(profile)
    for name in s["builder_flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise TensorRTBuildError("TensorRT %s has no builder flag %s" % (trt.__version__, name))
        config.set_flag(flag)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s["workspace_mib"]) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if s["dla_core"] is not None:
        if s["dla_core"] >= builder.num_DLA_cores:
            raise TensorRTBuildError(
                "DLA core %d requested but this device has %d DLA cores" % (s["dla_core"], builder.num_DLA_cores)
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(s["dla_core"])
        if s["gpu_fallback"]:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return input_name


def attach_timing_cache(config, cache_bytes):
    """Load a serialized timing cache (empty bytes start a new one); a stale cache is replaced."""
    cache = config.create_timing_cache(bytes(cache_bytes))
    if cache is None or not config.set_timing_cache(cache, False):
        # Corrupt or from another device/version: start fresh rather than fail the build.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def trt_build_serialized(trt, onnx_path, s, timing_cache_bytes):
    """Build from `onnx_path` with settings dict `s`; return (engine bytes, timing cache bytes | None, info)."""
    installed = check_tensorrt_version(trt, s)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt, s))
    parser = trt.OnnxParser(network, logger)
    parse_onnx(parser, onnx_path)
    config = builder.create_builder_config()
    input_name = configure_builder(trt, builder, network, config, s)
    if s["timing_cache"]:
        attach_timing_cache(config, timing_cache_bytes)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TensorRTBuildError("TensorRT failed to build the engine for %s (see the TensorRT log above)" % onnx_path)
    cache = bytes(memoryview(config.get_timing_cache().serialize())) if s["timing_cache"] else None
    info = {"tensorrt_version": installed, "input_name": input_name, "num_layers": int(network.num_layers)}
    return bytes(memoryview(engine)), cache, info


# ---- end of the self-contained part ----

_STANDALONE = (
    TensorRTBuildError,
    check_tensorrt_version,
    network_creation_flags,
    parse_onnx,
    dynamic_batch_profile,
    configure_builder,
    attach_timing_cache,
    trt_build_serialized,
)


def standalone_build_source() -> str:
    """Source of the self-contained TensorRT build code (stdlib + a `trt` module argument)."""
    return "\n\n".join(inspect.getsource(obj) for obj in _STANDALONE)


def build_engine(
    onnx_path: str | os.PathLike,
    settings: BuilderSettings,
    engine_path: str | os.PathLike,
    timing_cache_path: str | os.PathLike | None,
) -> dict[str, Any]:
    """Build and write (atomically) a TensorRT engine; update the timing cache file.

    Needs the ``tensorrt`` package and a CUDA GPU here (see `tensorrt_available`); where
    they are absent, ship a bundle (`medkd.export.bundle.write_bundle`) and build on the
    device. Raises `UserError` with TensorRT's parser errors when the ONNX cannot be parsed.
    """
    reason = tensorrt_available()
    if reason:
        raise UserError(f"cannot build a TensorRT engine here: {reason}; write an on-device bundle instead")
    import onnx
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    if settings.timing_cache and timing_cache_path is None:
        raise UserError("settings.timing_cache is on: pass a timing cache path")
    onnx_bytes = onnx_path.read_bytes()
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{onnx_path} is not a readable ONNX model: {e}") from None
    check_onnx_precision(model, settings.precision, onnx_path.name)
    cache_path = Path(timing_cache_path) if settings.timing_cache else None
    cache_in = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""

    start = time.perf_counter()
    try:
        engine, cache_out, info = trt_build_serialized(trt, onnx_path, settings.to_dict(), cache_in)
    except TensorRTBuildError as e:
        raise UserError(str(e)) from e
    seconds = time.perf_counter() - start
    atomic_save(engine_path, lambda tmp: tmp.write_bytes(engine))
    if cache_path is not None and cache_out is not None:
        atomic_save(cache_path, lambda tmp: tmp.write_bytes(cache_out))
    return {
        "engine": str(engine_path),
        "engine_size": len(engine),
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "timing_cache": None if cache_path is None else str(cache_path),
        "build_seconds": round(seconds, 3),
        "settings": settings.to_dict(),
        **info,
    }


# --------------------------------------------------------------------------------------
# This machine's device kind, and building through the engine cache
# --------------------------------------------------------------------------------------


def local_compute_capability() -> str | None:
    """The current CUDA GPU's compute capability (e.g. ``"8.7"``), or None when none is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:  # a CPU-only torch build or a broken driver: ask nvidia-smi instead
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # CUDA_VISIBLE_DEVICES order is not nvidia-smi's; only trust it when there is one answer.
    caps = {line.strip() for line in out.splitlines() if re.fullmatch(r"\s*\d+\.\d+\s*", line)}
    return caps.pop() if len(caps) == 1 else None


def local_l4t_release(release_file: str | os.PathLike = "/etc/nv_tegra_release") -> str | None:
    """The Jetson Linux (L4T) release, e.g. ``"36.4.3"``; None on a machine that is not a Jetson."""
    try:
        first = Path(release_file).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    # "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", first)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def gpu_mismatch(target: Mapping) -> str | None:
    """None when an engine built on this machine runs on `target`'s devices, else why it would not.

    Compares the GPU's compute capability, Jetson-or-not, and the installed TensorRT
    major.minor with the target config (engines do not move across any of them).
    """
    name = target.get("name", "?")
    have = local_compute_capability()
    if have is None:
        return "cannot read this machine's GPU compute capability"
    want = target.get("compute_capability")
    if want is not None and str(want) != have:
        return f"this GPU has compute capability {have}, target {name} has {want}"
    if target.get("jetpack") and local_l4t_release() is None:
        return f"target {name} is a Jetson (JetPack {target['jetpack']}) and this machine is not"
    want_trt = target.get("tensorrt_version")
    if want_trt is not None:
        try:
            import tensorrt as trt
        except Exception:
            return "tensorrt is not installed"
        if parse_tensorrt_version(trt.__version__) != parse_tensorrt_version(want_trt):
            return f"TensorRT {trt.__version__} is installed, target {name} deploys TensorRT {want_trt}"
    return None


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (self-contained: the bundle script copies it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_engine_cached(
    onnx_path: str | os.PathLike,
    settings: BuilderSettings,
    engine_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
) -> dict[str, Any]:
    """`build_engine` through the engine cache in `cache_dir`; the engine is then copied to `engine_path`.

    The cache key (`engine_cache_key`) folds in this machine's compute capability, L4T
    release and exact TensorRT version, so a hit is always an engine built for this device
    kind. The timing cache is kept per device kind beside the engines.
    """
    reason = tensorrt_available()
    if reason:
        raise UserError(f"cannot build a TensorRT engine here: {reason}; write an on-device bundle instead")
    import tensorrt as trt

    onnx_path, engine_path, cache_dir = Path(onnx_path), Path(engine_path), Path(cache_dir)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    capability = local_compute_capability()
    if capability is None:
        raise UserError("cannot read this machine's GPU compute capability, so the engine cache cannot be keyed")
    l4t = local_l4t_release()
    onnx_sha256 = sha256_file(onnx_path)
    key = engine_cache_key(settings, onnx_sha256, capability, l4t, tensorrt_full_version=str(trt.__version__))
    cached = engine_cache_path(cache_dir, key)
    hit = cached.is_file()
    if hit:
        info = {"engine_size": cached.stat().st_size, "engine_sha256": sha256_file(cached),
                "onnx_sha256": onnx_sha256, "settings": settings.to_dict(), "tensorrt_version": str(trt.__version__)}
    else:
        device_kind = f"sm{capability}-trt{trt.__version__}-l4t{l4t or 'none'}"
        info = build_engine(onnx_path, settings, cached, cache_dir / f"timing-{device_kind}.cache")
    atomic_save(engine_path, lambda tmp: shutil.copyfile(cached, tmp))
    return {
        **info,
        "engine": str(engine_path),
        "cache_key": key,
        "cache_hit": hit,
        "cached_engine": str(cached),
        "compute_capability": capability,
        "l4t_release": l4t,
    }
