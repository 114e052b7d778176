"""`medkd-build`: the one command. `medkd-build --help` lists recipes, targets and keys."""

from __future__ import annotations

import sys
import textwrap

from .config import GROUPS, group_options
from .errors import ConfigError, UserError

USAGE = """\
usage: medkd-build [key=value ...]
       medkd-build -m KEY=A,B [KEY=C,D ...] [hydra/launcher=submitit_slurm ...]   (a sweep)

Distil a frozen medical foundation model into a small student, export it for a deployment
target and profile it. Every key below is generated from toolchain/conf/*.yaml (defaults
shown), so this list is exactly what the config accepts.

Config groups (pick one file each; it sets the GROUP.KEY keys listed further down):
{groups}
Keys:
{main_keys}

Keys each group option sets (override as GROUP.KEY=VALUE after choosing the option):
{group_keys}

Export formats (a target's `formats:` list; export.formats=[...] overrides it):
{formats}

example:
  medkd-build recipe=rd target=jetson-orin
  medkd-build recipe=kd data=npz data.path=pathmnist.npz student=mobilenetv3
  medkd-build target=datacenter-gpu target.compute_capability=8.0 export.precision=int8
Re-export a finished run for another target: medkd-export RUN_DIR target=NAME [export.KEY=VALUE]
"""


def usage() -> str:
    from medkd.export.formats import format_table

    from .config import CONF_DIR
    from .config_help import WIDTH, file_description, group_keys, main_keys

    groups = "".join(f"  {g + '=':<10}{' | '.join(group_options(g))}\n" for g in GROUPS)
    sections = []
    for group in GROUPS:
        for option in group_options(group):
            description = file_description(CONF_DIR / group / f"{option}.yaml")
            sections += textwrap.wrap(f"{group}={option}" + (f": {description}" if description else ""),
                                      WIDTH, initial_indent="  ", subsequent_indent="      ")
            sections += group_keys(CONF_DIR, group, option)
    return USAGE.format(groups=groups, main_keys="\n".join(main_keys(CONF_DIR, GROUPS)),
                        group_keys="\n".join(sections), formats=format_table())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(usage())
        return 0
    if any(arg in ("-m", "--multirun") for arg in argv):
        return _sweep(argv)
    unknown_flags = [arg for arg in argv if arg.startswith("-")]
    if unknown_flags:
        return _fail(ConfigError(f"unknown option '{unknown_flags[0]}'; medkd-build takes key=value overrides (see --help)"))
    cfg = None
    try:
        from .config import load_config

        cfg = load_config(argv)  # config errors first: fast, before torch is imported
        from .pipeline import run

        run(cfg)
    except UserError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("medkd-build: interrupted; rerun the same command with resume=true to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk or exhausted memory is the user's to fix; anything else is a bug
        error = _resource_error(exc, cfg)
        if error is None:
            raise
        return _fail(error)
    return 0


def _resource_error(exc: Exception, cfg) -> UserError | None:
    from .resource_errors import resource_error

    where = "the run directory"
    if cfg is not None:
        from .pipeline import resolve_run_dir

        where = f"the run directory {resolve_run_dir(cfg)}"
    return resource_error(exc, where, retry="rerun the same command with resume=true to continue",
                          settings="train.batch_size, data.image_size, data.max_train")


def _sweep(argv: list[str]) -> int:
    """`medkd-build -m ...`: a Hydra multirun (toolchain/multirun.py)."""
    from .multirun import main as sweep_main

    try:
        return sweep_main(argv)
    except UserError as exc:
        return _fail(exc)


def _fail(exc: UserError) -> int:
    print(f"medkd-build: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
