"""`medkd-export RUN_DIR [target=NAME] [export.KEY=VALUE ...]`: re-export a finished run.

The trained student (student.safetensors) is exported again for another target or
precision without retraining; the run's report and config.yaml are updated, the previous
export's files are replaced only if the new export succeeds. The run directory is locked
while it runs (no build or other export may write it meanwhile), and its manifest.sha256
is updated for the files this command wrote.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from .config import CONF_DIR, group_options
from .errors import ConfigError, UserError

USAGE = """\
usage: medkd-export RUN_DIR [target=NAME] [target.KEY=VALUE] [export.KEY=VALUE ...]

Re-export the trained student of a finished medkd-build run for another target or
precision, without retraining. Targets: {targets}
Keys: see `medkd-build --help` (export.precision, export.formats, export.calibration.*, ...).

example:
  medkd-export runs/rd-mri-resnet18-jetson-orin target=cpu export.precision=int8
"""


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"cannot parse value '{text}'") from None


def apply_overrides(cfg, overrides: list[str]):
    """Only the target and export sections may change: everything else was fixed by training."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got '{item}' (see medkd-export --help)")
        if key == "target":
            if value not in group_options("target"):
                from medkd.export.formats import suggest

                raise ConfigError(f"unknown target '{value}'{suggest(value, group_options('target'))}; "
                                  f"choose one of: {', '.join(group_options('target'))}")
            cfg.target = OmegaConf.load(CONF_DIR / "target" / f"{value}.yaml")
        elif key.startswith(("export.", "target.")):
            OmegaConf.set_struct(cfg, True)
            try:
                OmegaConf.update(cfg, key, _parse_value(value), merge=False)
            except OmegaConfBaseException:
                raise ConfigError(f"unknown config key '{key}' (see medkd-build --help for the keys)") from None
            finally:
                OmegaConf.set_struct(cfg, False)
        else:
            raise ConfigError(f"medkd-export changes only target= and export.* keys, not '{key}'; "
                              "retrain with medkd-build to change it")
    return cfg


def with_current_defaults(saved):
    """A run's saved config, plus the keys this medkd added since (a run from an older medkd
    lacks them); the group sections (recipe, data, ...) are the run's own, untouched."""
    from omegaconf import OmegaConf

    from .config import GROUPS, load_config

    defaults = OmegaConf.to_container(load_config([]))
    for group in GROUPS:
        defaults.pop(group)
    return OmegaConf.merge(OmegaConf.create(defaults), saved)


def trained_deployables(cfg, task, run_dir: Path) -> dict:
    """The run's trained student, rebuilt through its recipe (so a student with task experts
    comes back whole) and split into what the recipe deploys (one fused model per task)."""
    import json

    from safetensors.torch import load_file

    from medkd.recipes import RECIPES, build_recipe

    from .models.students import build_student
    from .models.teachers import build_teacher

    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    teacher = json.loads((run_dir / "report.json").read_text()).get("teacher") or {}
    # A recipe that fine-tunes the foundation model (lora) rebuilds it around the teacher's
    # modules; student.safetensors then holds the whole fine-tuned model, teacher part included.
    recipe_cls = RECIPES.get(cfg.recipe.name)
    module = build_teacher(cfg.teacher) if recipe_cls is not None and recipe_cls.needs_teacher_module else None
    recipe = build_recipe(cfg.recipe, student, teacher.get("feature_dim"), tasks=task.tasks, teacher=module)
    try:
        recipe.student.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    except Exception as exc:  # wrong keys/shapes or a damaged file
        raise UserError(f"{run_dir / 'student.safetensors'} does not fit the run's student: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return {name: module.eval() for name, module in recipe.deployables().items()}


def reexport(run_dir: Path, overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from medkd.export.run_export import DEPLOYABLES, previous_artifacts, recorded_models

    from .atomic import atomic_write_text
    from .config import check_values
    from .data import load_task
    from .export_stage import deployed_summary, make_plan, run_export
    from .pipeline import RunLog
    from .progress import policy_from_config
    from .provenance import source_revision, write_manifest
    from .report import write_report
    from .rundir import LOG_NAME, locked, remove_stale_files
    from .targets import target_summary

    for name in ("config.yaml", "student.safetensors", "report.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a finished medkd run: {name} is missing")
    cfg = apply_overrides(with_current_defaults(OmegaConf.load(run_dir / "config.yaml")), overrides)
    check_values(cfg)
    task = load_task(cfg.data)
    plan = make_plan(cfg, task)  # every export option is checked before anything is written
    modules = trained_deployables(cfg, task, run_dir)
    source = source_revision()
    with locked(run_dir):
        remove_stale_files(run_dir)
        log = RunLog()
        log.attach(run_dir / LOG_NAME)
        log(f"medkd-export {' '.join(overrides)}")
        replaced_models = recorded_models(run_dir)
        section = run_export(cfg, run_dir, task, modules, plan, log, policy_from_config(cfg))

        report = json.loads((run_dir / "report.json").read_text())
        report["export"] = section
        report["target"] = target_summary(cfg.target, section)
        report.pop("device_latency", None)  # it measured the previous engine
        report.setdefault("run", {}).setdefault("exports", []).append(
            {"command": "medkd-export " + " ".join([str(run_dir), *overrides]),
             "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "medkd_source": source})
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        md_path, _ = write_report(run_dir, report)
        log(f"{deployed_summary(section)}; report: {md_path}")
        # The training side (checkpoint, student) keeps its recorded digests: never re-blessed here.
        models = set(replaced_models) | set(recorded_models(run_dir))  # removed ones leave the manifest
        ours = {path.name for model in models for path in previous_artifacts(run_dir, model)}
        ours |= {DEPLOYABLES, "config.yaml", "report.json", "report.md"}
        write_manifest(run_dir, rewritten=lambda rel: rel.split("/")[0] in ours)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(arg in ("-h", "--help", "help") for arg in argv):
        print(USAGE.format(targets=", ".join(group_options("target"))))
        return 0 if argv else 2
    run_dir, overrides = Path(argv[0]), argv[1:]
    try:
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} not found")
        reexport(run_dir, overrides)
    except UserError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("medkd-export: interrupted; the previous export is unchanged", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk or exhausted memory is the user's to fix; anything else is a bug
        from .resource_errors import resource_error

        error = resource_error(exc, f"the run directory {run_dir}",
                               retry="run the same medkd-export again",
                               settings="export.calibration.images, export.validation_images, export.latency_batches")
        if error is None:
            raise
        return _fail(error)
    return 0


def _fail(exc: UserError) -> int:
    print(f"medkd-export: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
