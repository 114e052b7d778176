"""`medkd-profile`: add trtexec's on-device latency to a run's report.

On the target, the bundle's ``build_engine.sh`` runs trtexec with ``--exportTimes``,
``--exportProfile`` and ``--exportLayerInfo``. Copied back, those files go in here; the run's
``report.json`` gains a ``device_latency`` section and ``report.md`` is rendered again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, UserError
from .report import write_report

# medkd.export.device_profile is imported inside the functions that need it: importing the
# medkd.export package loads torch (seconds), which --help and usage errors should not wait for.

PROG = "medkd-profile"
USAGE = f"{PROG} RUN_DIR TIMES_JSON [PROFILE_JSON] [LAYERS_JSON] [--batch N]"
DESCRIPTION = """\
Add on-device latency measured by trtexec to a medkd run report (report.json / report.md).
TIMES_JSON is trtexec's --exportTimes file; PROFILE_JSON (--exportProfile) and LAYERS_JSON
(--exportLayerInfo) are optional. Files are recognised by content, so any order works."""
EPILOG = """\
example:
  medkd-profile runs/rd-mri-resnet18-jetson-orin model.times.json model.profile.json model.layers.json"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {PROG} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder holding report.json")
    p.add_argument("files", metavar="TRTEXEC_JSON", nargs="+",
                   help="the times file, optionally the profile and layer-info files, in any order")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                   help="batch size trtexec ran (default: export.profile_batch in report.json, else 1)")
    return p


def _load_report(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(f"no report.json in {run_dir}; pass the folder of a finished medkd-build run")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(report).__name__}")
    return report


def _recorded_batch(report: dict) -> tuple[int, str]:
    """The batch the bundle told trtexec to use, and where that number came from."""
    export = report.get("export")
    batch = export.get("profile_batch") if isinstance(export, dict) else None
    if batch is None:
        return 1, "the default; report.json has no export.profile_batch"
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"report.json export.profile_batch is {batch!r}, not a positive integer; pass --batch N")
    return batch, "report.json export.profile_batch"


def _assign_roles(paths: list[str]) -> dict[str, str]:
    """{kind: path} for the given files, recognised by content; exactly one times file."""
    from medkd.export.device_profile import EXPECTED, KIND_NAMES, TIMES, identify_trtexec_file

    roles: dict[str, str] = {}
    for path in paths:
        kind = identify_trtexec_file(path)
        if kind in roles:
            raise UserError(f"{roles[kind]} and {path} are both {KIND_NAMES[kind]}; pass one of each")
        roles[kind] = path
    if TIMES not in roles:
        raise UserError(f"none of the files is {EXPECTED[TIMES]}; it is required")
    return roles


def add_device_latency(run_dir: str | Path, paths: list[str], batch: int | None = None) -> dict:
    """Put the ``device_latency`` section from trtexec files into the run's report; return it."""
    run_dir = Path(run_dir)
    report = _load_report(run_dir)  # before the slow import below: a wrong folder fails fast
    from medkd.export.device_profile import LAYERS, PROFILE, TIMES, device_latency_section

    roles = _assign_roles(paths)
    batch_source = "--batch"
    if batch is None:
        batch, batch_source = _recorded_batch(report)
    section = device_latency_section(roles[TIMES], roles.get(PROFILE), roles.get(LAYERS), batch_size=batch)
    section["batch_source"] = batch_source
    report["device_latency"] = section
    from .provenance import write_manifest
    from .rundir import locked

    try:
        with locked(run_dir):  # no build or export writes the run meanwhile; the manifest follows
            write_report(run_dir, report)
            write_manifest(run_dir, rewritten=lambda rel: rel in ("report.json", "report.md"))
    except OSError as exc:
        raise UserError(f"cannot write the report in {run_dir} ({exc.strerror})") from None
    return section


def _summary(section: dict, run_dir: str) -> str:
    pct = " / ".join(f"{section[f'p{q}_ms']:.3f}" for q in (50, 90, 99))
    lines = [
        f"GPU compute time p50 / p90 / p99: {pct} ms over {section['count']} inferences "
        f"(batch {section['batch_size']}, from {section['batch_source']})"
    ]
    if "latency" in section:
        lat = " / ".join(f"{section['latency'][f'p{q}_ms']:.3f}" for q in (50, 90, 99))
        lines.append(f"Latency incl. H2D/D2H p50 / p90 / p99: {lat} ms")
    if "layers" in section:
        lines.append(f"Per-layer times: {len(section['layers'])} layers over {section['profile_runs']} profiled runs")
    lines.append(f"Report updated: {Path(run_dir) / 'report.md'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        section = add_device_latency(args.run_dir, args.files, args.batch)
    except SystemExit as exc:  # --help printed its text
        return exc.code if isinstance(exc.code, int) else 0
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(_summary(section, args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
