"""logger=tensorboard: per-epoch scalars are written as TensorBoard events, read back here."""

from __future__ import annotations

import pytest

from medkd.toolchain.config import load_config
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.metrics_log import NullMetricsLogger, build_metrics_logger


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_every_finite_number_per_epoch(tmp_path):
    logger = build_metrics_logger("tensorboard", tmp_path)
    logger.log_epoch(1, {"epoch": 1, "loss": 2.5, "val_accuracy": 0.25, "note": "text", "bad": float("nan")})
    logger.log_epoch(2, {"epoch": 2, "loss": 1.5, "val_accuracy": 0.5, "flag": True})
    logger.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"epoch/loss", "epoch/val_accuracy"}
    assert scalars["epoch/loss"] == [(1, 2.5), (2, 1.5)]
    assert scalars["epoch/val_accuracy"] == [(1, 0.25), (2, 0.5)]


def test_none_writes_nothing(tmp_path):
    logger = build_metrics_logger("none", tmp_path)
    assert type(logger) is NullMetricsLogger
    logger.log_epoch(1, {"loss": 1.0})
    logger.close()
    assert not any(tmp_path.iterdir())


def test_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="logger must be one of: none, tensorboard; got 'wandb'"):
        load_config(["logger=wandb"])
