"""`medkd-build -m recipe=kd,rd seed=0,1,2`: a sweep through Hydra's multirun, one run
directory per job, and a summary table at the end.

    medkd-build -m recipe=kd,rd seed=0,1,2                       # jobs one after another, here
    medkd-build -m recipe=kd,rd hydra/launcher=submitit_slurm \\
        hydra.launcher.partition=gpu hydra.launcher.timeout_min=120  # one Slurm job each

Hydra expands the sweep and its launcher runs the jobs (the basic launcher here, or
hydra-submitit-launcher's `submitit_slurm` / `submitit_local`). Every job's config is
composed and checked here before the first job starts, so a typo fails in one line
instead of in job 5. Each job builds into `<sweep dir>/<its swept overrides>` (e.g.
`runs/multirun/2026-11-25_20-01-02/recipe=kd,seed=0`), so jobs never share a run
directory or its lock. A failed job does not stop the sweep: it is recorded, the rest
run, the summary shows it, and the exit status is non-zero.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import traceback
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf, read_write

from .atomic import atomic_write_text
from .errors import ConfigError, UserError
from .resource_errors import resource_error

MULTIRUN_FLAGS = ("-m", "--multirun")
STATUS_DIR = ".jobs"  # inside the sweep dir: one <job number>.json per job
# Hydra options medkd fixes for a sweep: medkd writes its own config and log into each run
# directory, never changes the working directory, and names job folders by their overrides.
HYDRA_SETTINGS = (
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
    "hydra.output_subdir=null",
    "hydra.job.chdir=false",
    "hydra.sweep.subdir='${medkd_job_dir:${hydra.job.override_dirname}}'",
)


MAX_NAME = 120


def job_dir_name(override_dirname: str) -> str:
    """A job folder name from its swept overrides: one path component, readable, not too long."""
    name = override_dirname.replace("/", "_") or "defaults"
    if len(name) > MAX_NAME:  # keep it unique: a digest of the whole name after a readable head
        name = f"{name[:MAX_NAME - 13]}..{hashlib.sha256(name.encode()).hexdigest()[:11]}"
    return name


OmegaConf.register_new_resolver("medkd_job_dir", job_dir_name, replace=True)


def is_multirun(argv: list[str]) -> bool:
    return any(arg in MULTIRUN_FLAGS for arg in argv)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(medkd overrides, hydra overrides) of a sweep command line, flags removed."""
    args = [a for a in argv if a not in MULTIRUN_FLAGS]
    hydra = [a for a in args if a.startswith(("hydra.", "hydra/"))]
    return [a for a in args if a not in hydra], hydra


def fixed_keys(overrides: list[str]) -> list[str]:
    """Keys every job shares: left out of job folder names (each run's config.yaml has them)."""
    jobs = expand_sweep(overrides)
    keys = [item.split("=", 1)[0] for item in jobs[0]]
    return [key for i, key in enumerate(keys) if len({job[i] for job in jobs}) == 1]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's override list, as Hydra's basic sweeper orders them (last key varies fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse sweep override: {str(exc).splitlines()[0]}") from None
    choices = []
    for item in parsed:
        key = item.get_key_element()
        if item.is_sweep_override():
            choices.append([f"{key}={value}" for value in item.sweep_string_iterator()])
        else:
            choices.append([item.input_line])
    return [list(job) for job in itertools.product(*choices)]


def check_jobs(overrides: list[str]) -> list[list[str]]:
    """Compose and check every job's config before any job runs; refuse a shared run_dir."""
    from .config import load_config

    if any(item.split("=", 1)[0] in ("run_dir", "+run_dir") for item in overrides):
        raise ConfigError("run_dir cannot be set in a sweep (every job gets its own folder); "
                          "set the sweep's parent folder with hydra.sweep.dir=DIR")
    jobs = expand_sweep(overrides)
    for job in jobs:
        try:
            load_config(job)
        except ConfigError as exc:
            raise ConfigError(f"sweep job {' '.join(job) or '(defaults)'}: {exc}") from None
    return jobs


def run_job(cfg) -> dict:
    """Hydra's task function: one build into this job's folder; never raises for a failed build."""
    from hydra.core.hydra_config import HydraConfig

    from .config import check_values
    from .pipeline import run

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    export_slurm_ddp_environment()
    status = {"job": hydra.job.num, "name": run_dir.name, "overrides": list(hydra.overrides.task),
              "run_dir": str(run_dir)}
    print(f"== sweep job {hydra.job.num}: {' '.join(status['overrides']) or '(defaults)'} -> {run_dir}", flush=True)
    try:
        with read_write(cfg):
            cfg.run_dir = str(run_dir)
        check_values(cfg)
        report = run(cfg)
    except UserError as exc:
        status.update(status="failed", error=str(exc))
        print(f"medkd-build: job {hydra.job.num} failed: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - a bug in one job must not hide the others' results
        error = resource_error(exc, f"the run directory {run_dir}", retry="rerun the sweep job with resume=true",
                               settings="train.batch_size, data.image_size, data.max_train")
        if error is None:
            traceback.print_exc()
        status.update(status="failed", error=str(error) if error else f"internal error: {type(exc).__name__}: {exc}")
    else:
        if not report:  # another process of a multi-GPU job: rank 0 reports
            return status
        status.update(status="ok", **job_summary(report))
    atomic_write_text(Path(hydra.sweep.dir) / STATUS_DIR / f"{hydra.job.num}.json", json.dumps(status, indent=1))
    return status


def export_slurm_ddp_environment() -> None:
    """Inside a submitit job with several tasks (tasks_per_node > 1), set the variables
    torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, ...) so the build trains with DDP."""
    try:
        import submitit

        tasks = submitit.JobEnvironment().num_tasks
    except (ImportError, RuntimeError):  # not a submitit job
        return
    if tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def job_summary(report: dict) -> dict:
    models = (report.get("export") or {}).get("models") or {}
    deployed = next(iter(models.values()), {})
    return {
        "test_accuracy": report["training"]["test_accuracy"],
        "deployed_precision": deployed.get("deployed_precision"),
        "deployed_test_metric": (deployed.get("test_metric") or {}).get(deployed.get("deployed_precision")),
        "wall_time_s": report["run"]["wall_time_s"],
    }


def read_statuses(sweep_dir: Path) -> list[dict]:
    folder = Path(sweep_dir) / STATUS_DIR
    statuses = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(statuses, key=lambda s: s["job"])


def summary_table(statuses: list[dict]) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    rows = ["| job | swept overrides | status | test acc % (fp32) | deployed | deployed test % | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in statuses:
        ok = s["status"] == "ok"
        rows.append(
            f"| {s['job']} | {s['name']} | "
            f"{'ok' if ok else 'FAILED: ' + s.get('error', '?')} | {pct(s.get('test_accuracy'))} | "
            f"{s.get('deployed_precision') or '-'} | {pct(s.get('deployed_test_metric'))} | "
            f"{s.get('wall_time_s', '-')} |"
        )
    return "\n".join(rows)


def default_sweep_dir() -> str:
    return str(Path("runs") / "multirun" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def main(argv: list[str]) -> int:
    """Run a sweep; return the exit status (0 only if every job succeeded)."""
    import hydra

    overrides, hydra_overrides = split_overrides(argv)
    jobs = check_jobs(overrides)  # ConfigError propagates to the CLI's one-line handler
    sweep_dir = next((o.split("=", 1)[1] for o in hydra_overrides if o.startswith("hydra.sweep.dir=")), None)
    if sweep_dir is None:
        sweep_dir = default_sweep_dir()
        hydra_overrides.append(f"hydra.sweep.dir={sweep_dir}")
    print(f"sweep: {len(jobs)} job(s) into {sweep_dir}", flush=True)
    shared = fixed_keys(overrides)
    if shared:  # job folders are named by what varies between jobs
        hydra_overrides.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(shared)}]")

    from .config import CONF_DIR

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_job)
    saved_argv = sys.argv
    sys.argv = ["medkd-build", "--multirun", *overrides, *HYDRA_SETTINGS, *hydra_overrides]
    try:
        app()
    except SystemExit as exc:  # Hydra exits on its own argument errors
        if exc.code:
            raise ConfigError("Hydra refused the sweep's arguments (see the message above)") from None
    finally:
        sys.argv = saved_argv

    statuses = read_statuses(Path(sweep_dir))
    table = summary_table(statuses)
    atomic_write_text(Path(sweep_dir) / "summary.md", table + "\n")
    print(table, flush=True)
    failed = [s for s in statuses if s["status"] != "ok"]
    missing = len(jobs) - len(statuses)
    if failed or missing:
        print(f"medkd-build: {len(failed)} of {len(jobs)} sweep job(s) failed"
              + (f", {missing} left no result" if missing else ""), file=sys.stderr)
        return 1
    return 0
