"""`medkd-verify RUN_DIR`: check a run directory's files against its manifest.sha256.

Exit 0 and "RUN_DIR: ok N files" when every listed file is present with its recorded
sha256 and nothing else was added; exit 1 with one line naming the changed, missing and
extra files otherwise (or when there is no manifest, or a medkd command is writing the
directory right now).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ConfigError, UserError

USAGE = """\
usage: medkd-verify RUN_DIR

Check every file of a finished medkd run against RUN_DIR/manifest.sha256, which medkd-build
writes when it finishes and medkd-export / medkd-profile update (log.txt is not listed: every
command appends to it). The same file works with `sha256sum -c manifest.sha256` in RUN_DIR,
which does not notice added files.
"""


def verify(run_dir: Path) -> int:
    """The number of files checked; UserError naming every difference."""
    from .provenance import check_manifest
    from .rundir import lock_holder

    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise UserError(f"{run_dir} is being written by a medkd command (PID {holder}); verify it when that finishes")
    check = check_manifest(run_dir)
    if not check.ok:
        raise UserError(f"{run_dir} does not match its manifest: {check.problems()}")
    return check.files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(USAGE)
        return 0
    try:
        if len(argv) != 1 or argv[0].startswith("-"):
            raise ConfigError("expected exactly one argument, the run directory (see medkd-verify --help)")
        run_dir = Path(argv[0])
        files = verify(run_dir)
    except UserError as exc:
        print(f"medkd-verify: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # an unreadable file: say which, as one line
        print(f"medkd-verify: error: cannot read {exc.filename or run_dir} ({exc.strerror})", file=sys.stderr)
        return 1
    print(f"{run_dir}: ok {files} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
