"""`medkd-build`: the one command. `medkd-build --help` lists recipes, targets and keys."""

from __future__ import annotations

import sys

from .config import GROUPS, group_options
from .errors import ConfigError, UserError

USAGE = """\
usage: medkd-build [key=value ...]

Distil a frozen medical foundation model into a small student, export it to ONNX and
profile it for a deployment target. Config groups (pick one file each):
{groups}
Common keys (defaults in parentheses):
  run_dir=PATH              where artifacts go (runs/<recipe>-<data>-<student>-<target>)
  resume=true               continue an interrupted run from its last epoch
  overwrite=true            replace an existing run in run_dir
  seed=INT (0)   threads=INT   progress=auto|true|false
  train.epochs=INT (12)  train.batch_size=INT (128)  train.lr=FLOAT (0.002)
  data.path=PATH  data.image_size=INT  data.max_train=INT  data.max_test=INT
  data.train_fraction=FLOAT (1.0, e.g. 0.1 for the data-scarce setting)
  data.unlabelled_transfer=BOOL (true: kd/rd distil on the images whose labels were withheld)
  teacher.checkpoint=FILE  teacher.arch=TIMM_NAME  student.pretrained_checkpoint=FILE
Export keys (defaults from conf/config.yaml; the target sets precision and formats):
{export_keys}
Export formats (a target's `formats:` list; export.formats=[...] overrides it):
{formats}

example:
  medkd-build recipe=rd target=jetson-orin
  medkd-build recipe=kd data=npz data.path=pathmnist.npz student=mobilenetv3
  medkd-build target=datacenter-gpu target.compute_capability=8.0 export.precision=int8
Re-export a finished run for another target: medkd-export RUN_DIR target=NAME [export.KEY=VALUE]
"""


def _flatten(prefix: str, node) -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in _flatten(f"{prefix}.{key}", value)]
    return [(prefix, node)]


def usage() -> str:
    from omegaconf import OmegaConf

    from medkd.export.formats import format_table

    from .config import load_config

    lines = "".join(f"  {g + '=':<10}{' | '.join(group_options(g))}\n" for g in GROUPS)
    defaults = _flatten("export", OmegaConf.to_container(load_config([]).export))
    export_keys = "\n".join(f"  {key}={'null' if value is None else value}" for key, value in defaults)
    return USAGE.format(groups=lines, export_keys=export_keys, formats=format_table())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(usage())
        return 0
    unknown_flags = [arg for arg in argv if arg.startswith("-")]
    if unknown_flags:
        return _fail(ConfigError(f"unknown option '{unknown_flags[0]}'; medkd-build takes key=value overrides (see --help)"))
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
    return 0


def _fail(exc: UserError) -> int:
    print(f"medkd-build: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
