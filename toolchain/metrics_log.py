"""Per-epoch training scalars for experiment trackers, beside log.txt (`logger=tensorboard`).

    metrics = build_metrics_logger(cfg.logger, run_dir)
    metrics.log_epoch(3, {"loss": 0.41, "val_accuracy": 0.83})
    metrics.close()

`none` writes nothing; `tensorboard` writes event files to `run_dir/tensorboard/`
(view with `tensorboard --logdir runs/`). Adding a tracker is one class and one line in
LOGGERS.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from .errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class NullMetricsLogger:
    def log_epoch(self, epoch: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullMetricsLogger):
    """Every finite number in an epoch record becomes the scalar `epoch/<name>` at step = epoch."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_epoch(self, epoch: int, record: dict) -> None:
        for name, value in record.items():
            if name != "epoch" and isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{name}", float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS = {"none": NullMetricsLogger, "tensorboard": TensorBoardLogger}


def check_logger_name(name) -> None:
    if name not in LOGGERS:
        raise ConfigError(f"logger must be one of: {', '.join(LOGGERS)}; got '{name}'")


def build_metrics_logger(name: str, run_dir: Path) -> NullMetricsLogger:
    check_logger_name(name)
    if name == "none":
        return NullMetricsLogger()
    try:
        return LOGGERS[name](run_dir)
    except ImportError as exc:
        raise ConfigError(f"logger={name} needs a package that is not installed ({exc}); "
                          "reinstall medkd (bash scripts/setup.sh) or use logger=none") from None
