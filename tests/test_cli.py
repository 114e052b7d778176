"""The command line: help, config composition, and one-line errors for user mistakes."""

import subprocess
import sys

import pytest

from medkd.toolchain.cli import main
from medkd.toolchain.config import group_options, load_config
from medkd.toolchain.errors import ConfigError


def test_help_lists_every_recipe_and_target(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in group_options("recipe") + group_options("target"):
        assert name in out
    assert {"rd", "kd", "scratch"} <= set(group_options("recipe"))
    assert "jetson-orin" in group_options("target")


def test_groups_and_overrides_compose():
    cfg = load_config(["recipe=kd", "target=jetson-orin", "train.epochs=3", "data.train_fraction=0.1"])
    assert cfg.recipe.name == "kd" and cfg.recipe.temperature > 0
    assert cfg.target.name == "jetson-orin" and cfg.target.runtime == "tensorrt"
    assert cfg.train.epochs == 3 and cfg.data.train_fraction == 0.1


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["recipe=nope"], "unknown recipe 'nope'"),
        (["target=toaster"], "unknown target 'toaster'"),
        (["no_such_key=1"], "unknown config key 'no_such_key'"),
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["train.epochs=abc"], "train.epochs must be a positive integer"),
        (["train.lr=-1"], "train.lr must be a positive number"),
        (["resume=maybe"], "resume must be true or false"),
        (["data=npz"], "missing required value(s): data.path"),
        (["recipe"], "expected key=value"),
        (["train.lr=[1"], "cannot parse override"),
    ],
)
def test_bad_config_is_a_config_error(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_usage_errors_exit_2_with_one_line(capsys):
    assert main(["recipe=nope"]) == 2
    assert main(["--verbose"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("medkd-build: error:") for line in err)


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "medkd.toolchain.cli", "target=mars"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown target 'mars'" in proc.stderr
