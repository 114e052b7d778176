"""Sweeps: `medkd-build -m ...` through Hydra's multirun, one run directory per job, a summary."""

from __future__ import annotations

import json

import pytest

from medkd.toolchain.cli import main
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.multirun import check_jobs, expand_sweep, job_dir_name, summary_table

from test_pipeline import SMALL


def test_sweep_expands_to_the_cartesian_product_last_key_fastest():
    jobs = expand_sweep(["recipe=kd,rd", "seed=0,1,2", "train.epochs=1"])
    assert len(jobs) == 6
    assert jobs[0] == ["recipe=kd", "seed=0", "train.epochs=1"]
    assert jobs[1] == ["recipe=kd", "seed=1", "train.epochs=1"]
    assert jobs[-1] == ["recipe=rd", "seed=2", "train.epochs=1"]


def test_every_job_is_checked_before_any_runs():
    with pytest.raises(ConfigError, match="sweep job recipe=nope: unknown recipe 'nope'"):
        check_jobs(["recipe=kd,nope"])
    with pytest.raises(ConfigError, match="train.epochs must be a positive integer"):
        check_jobs(["seed=0,1", "train.epochs=0"])


def test_a_shared_run_dir_is_refused(tmp_path, capsys):
    assert main(["-m", "seed=0,1", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "run_dir cannot be set in a sweep" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_job_folders_are_one_path_component():
    assert job_dir_name("data.path=/a/b.npz,seed=0") == "data.path=_a_b.npz,seed=0"
    assert job_dir_name("") == "defaults"


def test_summary_table_shows_failures():
    table = summary_table([
        {"job": 0, "name": "seed=0", "status": "ok", "test_accuracy": 0.5, "deployed_precision": "int8",
         "deployed_test_metric": 0.51, "wall_time_s": 9.0},
        {"job": 1, "name": "seed=1", "status": "failed", "error": "disk full"},
    ])
    assert "| 0 | seed=0 | ok | 50.0 | int8 | 51.0 | 9.0 |" in table
    assert "| 1 | seed=1 | FAILED: disk full | - | - | - | - |" in table


def _sweep_args(tmp_path, *extra):
    base = [o for o in SMALL if not o.startswith("export.precision")]
    return ["-m", *base, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]


def test_sweep_builds_each_job_in_its_own_folder_and_keeps_going_after_a_failure(tmp_path, capsys):
    # The second job asks the cpu target for fp16, which it does not run: it fails at
    # planning, after the first job built, and must not stop the sweep.
    code = main(_sweep_args(tmp_path, "recipe=scratch", "export.precision=fp32,fp16"))
    out, err = capsys.readouterr()
    assert code == 1, err
    sweep = tmp_path / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    # folders are named by what varies between jobs; what they share is in each config.yaml
    ok_dir = [j for j in jobs if j == "export.precision=fp32"]
    assert len(ok_dir) == 1 and "export.precision=fp16" in jobs
    report = json.loads((sweep / ok_dir[0] / "report.json").read_text())
    assert report["run"]["run_dir"] == str(sweep / ok_dir[0])
    summary = (sweep / "summary.md").read_text()
    assert summary in out
    assert summary.count("| ok |") == 1 and "FAILED: " in summary and "fp16" in summary
    assert "1 of 2 sweep job(s) failed" in err and "Traceback" not in err


def test_submitit_local_launcher_runs_the_job_in_its_own_process(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    code = main(_sweep_args(tmp_path, "recipe=scratch", "seed=0", "export.precision=fp32",
                            "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"))
    out, err = capsys.readouterr()
    assert code == 0, err
    status = json.loads((tmp_path / "sweep" / ".jobs" / "0.json").read_text())
    assert status["status"] == "ok" and 0.0 <= status["test_accuracy"] <= 1.0
    run_dir = tmp_path / "sweep" / status["run_dir"].rsplit("/", 1)[-1]
    assert status["run_dir"] == str(run_dir) and (run_dir / "report.json").is_file()
    assert "| 0 |" in out


def test_long_job_names_stay_unique_and_bounded():
    a, b = job_dir_name("x=" + "a" * 300), job_dir_name("x=" + "a" * 299 + "b")
    assert len(a) <= 120 and len(b) <= 120 and a != b


def test_the_ready_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medkd.toolchain.config import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=["hydra/launcher=medkd_slurm", "hydra.launcher.partition=gpu"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 240
