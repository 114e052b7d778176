"""Turn `target` + `export` config into an export plan, or refuse with a one-line error.

Runs before training (and before the run directory is touched), so a bad precision,
format or calibration size never costs a training run.
"""

from __future__ import annotations

from dataclasses import dataclass

from medkd.toolchain.errors import ConfigError

from .formats import FORMATS, PRECISION_FORMAT, PRECISIONS, check_format_names, suggest


@dataclass(frozen=True)
class ExportPlan:
    requested_precision: str  # fp32 | fp16 | int8 | best
    precisions: tuple[str, ...]  # ONNX precisions to build, fp32 first (it is the reference)
    fallback_precision: str  # deployed when int8 is refused by the guard
    formats: tuple[str, ...]  # in the order they run
    calibration_images: int
    validation_images: int


def fallback_precision(target: dict) -> str:
    return "fp16" if "fp16" in target["precisions"] else "fp32"


def plan_export(target: dict, export: dict, labelled_train: int, all_train: int,
                input_shape: tuple[int, int, int]) -> ExportPlan:
    """`labelled_train`/`all_train`: training images with labels / in total (with the transfer set)."""
    precision = export.get("precision") or target["precision"]
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown export.precision '{precision}'{suggest(precision, PRECISIONS)}; "
                          f"choose from: {', '.join(PRECISIONS)}")
    if precision != "best" and precision not in target["precisions"]:
        raise ConfigError(f"target {target['name']} does not support precision {precision}; "
                          f"choose from: {', '.join([*target['precisions'], 'best'])}")
    precisions = ["fp32"]
    if precision in ("int8", "best"):
        precisions += [p for p in (fallback_precision(target), "int8") if p not in precisions]
    elif precision == "fp16":
        precisions.append("fp16")

    requested = list(export.get("formats") or target["formats"])
    check_format_names(requested, target)
    formats = ["onnx"] + [PRECISION_FORMAT[p] for p in precisions if p in PRECISION_FORMAT]
    formats += [f for f in requested if f not in formats]
    for name in formats:
        if FORMATS[name].needs_calibration and precision not in ("int8", "best"):
            raise ConfigError(f"format '{name}' needs export.precision=int8 or best")

    if "tensorrt" in formats or "bundle" in formats:
        _check_tensorrt(target, export, precisions, input_shape)
    validation = _validation_images(export, labelled_train)
    calibration = _calibration_images(export, all_train - validation) if "int8" in precisions else 0
    _check_latency(export)
    return ExportPlan(precision, tuple(precisions), fallback_precision(target), tuple(formats), calibration, validation)


def _check_tensorrt(target: dict, export: dict, precisions: list[str], input_shape) -> None:
    """Builder settings are a pure function: compute them now so DLA or shape mistakes fail early."""
    from .tensorrt import builder_settings

    for precision in precisions[1:] or precisions:  # fp32 is only the reference when more are built
        builder_settings(target["tensorrt_version"], target, precision, tuple(input_shape), export.get("dla_core"))


def _validation_images(export: dict, labelled_train: int) -> int:
    wanted = export["validation_images"]
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ConfigError(f"export.validation_images must be a positive integer, got '{wanted}'")
    if labelled_train < 2:
        raise ConfigError("export needs at least 2 labelled training images (validation for parity and the int8 guard)")
    # At most half the labelled images, so calibration always has images of its own.
    return min(wanted, labelled_train // 2)


def _calibration_images(export: dict, available: int) -> int:
    wanted = export["calibration"]["images"]
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ConfigError(f"export.calibration.images must be a positive integer, got '{wanted}'")
    if wanted > available:
        raise ConfigError(
            f"export.calibration.images={wanted} is more than the {available} training images left "
            f"after the validation images; pass export.calibration.images={available} or fewer"
        )
    method = export["calibration"]["method"]
    if method not in ("minmax", "percentile"):
        raise ConfigError(f"export.calibration.method must be minmax or percentile, got '{method}'"
                          + suggest(str(method), ("minmax", "percentile")))
    return wanted


def _check_latency(export: dict) -> None:
    batches, threads = export["latency_batches"], export["latency_threads"]
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise ConfigError(f"export.latency_batches must be a list of positive integers, got {batches}")
    if not threads or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in threads):
        raise ConfigError(f"export.latency_threads must be a list of integers >= 0 (0 = all CPUs), got {threads}")
    drop = export["max_accuracy_drop"]
    if not isinstance(drop, (int, float)) or isinstance(drop, bool) or drop < 0:
        raise ConfigError(f"export.max_accuracy_drop must be a number >= 0 (percentage points), got '{drop}'")
    for key, value in export["parity"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"export.parity.{key} must be a number in [0, 1], got '{value}'")
