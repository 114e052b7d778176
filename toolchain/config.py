"""Compose the run configuration from `toolchain/conf` plus `key=value` overrides.

Hydra's compose API does the group handling (`recipe=rd` picks `conf/recipe/rd.yaml`)
and refuses unknown keys (struct mode); every failure becomes a one-line
`ConfigError` instead of Hydra's multi-line traceback.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .metrics_log import check_logger_name

CONF_DIR = Path(__file__).parent / "conf"
# Accepted `device` and `train.precision` values (toolchain/device.py acts on them).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# Accepted `teacher.backend` and `teacher.precision` (toolchain/models/teacher_runtime.py acts on them).
TEACHER_BACKENDS = ("torch", "onnxruntime")
TEACHER_PRECISIONS = ("fp32", "int8")
GROUPS = ("recipe", "target", "data", "teacher", "student")


def group_options(group: str) -> list[str]:
    """The names a config group accepts, e.g. group_options("recipe") -> ["kd", "rd", "scratch"]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_config(overrides: list[str]) -> DictConfig:
    """Compose the config; raise ConfigError (exit 2) for anything the user got wrong."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}' (see medkd-build --help)")
        key, value = item.split("=", 1)
        if key in GROUPS and value not in group_options(key):
            raise ConfigError(
                f"unknown {key} '{value}'; choose one of: {', '.join(group_options(key))}"
            )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
            cfg = compose(config_name="config", overrides=list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse override: {_one_line(exc)}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    check_values(cfg)
    return cfg


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("Could not override"):
        # Hydra suggests '+key=value' to add keys; medkd has a fixed schema, so say so.
        key = text.split("'")[1] if "'" in text else "?"
        return f"unknown config key '{key}' (see medkd-build --help for the keys)"
    if text.startswith("Ambiguous value for argument"):
        # Hydra's advice is on the lines that follow; e.g. data.intensity=window:40,400.
        return f"{text}: quote a value holding commas, e.g. \"data.intensity='window:40,400'\""
    return text


def check_values(cfg: DictConfig) -> None:
    """Range/type checks Hydra cannot do on untyped YAML."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(sorted(missing))} (pass key=value)")
    _positive_int(cfg.train.epochs, "train.epochs")
    _positive_int(cfg.train.batch_size, "train.batch_size")
    _positive_int(cfg.train.teacher_batch_size, "train.teacher_batch_size")
    _positive_number(cfg.train.lr, "train.lr")
    _non_negative_number(cfg.train.weight_decay, "train.weight_decay")
    _non_negative_number(cfg.train.val_fraction, "train.val_fraction")
    if cfg.train.val_fraction >= 1:
        raise ConfigError(f"train.val_fraction must be below 1, got {cfg.train.val_fraction}")
    _positive_int(cfg.export.latency_runs, "export.latency_runs")
    _positive_int(cfg.export.opset, "export.opset")
    if not 13 <= cfg.export.opset <= 21:
        raise ConfigError(f"export.opset must be between 13 (per-channel int8) and 21, got {cfg.export.opset}")
    if cfg.export.dla_core is not None:
        _non_negative_int(cfg.export.dla_core, "export.dla_core")
    if not isinstance(cfg.export.firmware_c_source, bool):
        raise ConfigError(f"export.firmware_c_source must be true or false, got '{cfg.export.firmware_c_source}'")
    _non_negative_int(cfg.export.latency_warmup, "export.latency_warmup")
    _non_negative_int(cfg.seed, "seed")
    if cfg.threads is not None:
        _positive_int(cfg.threads, "threads")
    for flag in ("resume", "overwrite"):
        if not isinstance(cfg[flag], bool):
            raise ConfigError(f"{flag} must be true or false, got '{cfg[flag]}'")
    if cfg.progress not in ("auto", True, False):
        raise ConfigError(f"progress must be auto, true or false, got '{cfg.progress}'")
    _positive_number(cfg.progress_interval, "progress_interval")
    check_logger_name(cfg.logger)
    if cfg.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{cfg.device}'")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{cfg.train.precision}'")
    check_teacher_runtime(cfg.teacher.get("backend", "torch"), cfg.teacher.get("precision", "fp32"))


def check_teacher_runtime(backend, precision) -> None:
    """One-line ConfigError for a teacher backend/precision medkd cannot run."""
    if backend not in TEACHER_BACKENDS:
        raise ConfigError(f"teacher.backend must be one of {', '.join(TEACHER_BACKENDS)}, got '{backend}'")
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"teacher.precision must be one of {', '.join(TEACHER_PRECISIONS)}, got '{precision}'")
    if precision != "fp32" and backend != "onnxruntime":
        raise ConfigError(f"teacher.precision={precision} needs teacher.backend=onnxruntime")


def _positive_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got '{value}'")


def _non_negative_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got '{value}'")


def _positive_number(value, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got '{value}'")


def _non_negative_number(value, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key} must be a non-negative number, got '{value}'")


def default_run_dir(cfg: DictConfig) -> Path:
    name = f"{cfg.recipe.name}-{cfg.data.name}-{cfg.student.name}-{cfg.target.name}"
    return Path("runs") / name
