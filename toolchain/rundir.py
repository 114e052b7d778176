"""The run directory: where it may go, who may write it, and what a new build clears first.

    check_location(run_dir)            # before anything: a file, an unwritable parent -> UserError
    with locked(run_dir):              # one medkd command per run directory at a time
        prepare(run_dir, resume=..., overwrite=..., fingerprint=...)

The lock is `fcntl.flock` on `run_dir/.medkd.lock`, which holds the holder's PID. The kernel
drops a flock when its process dies, however it dies, so a killed build never leaves the
directory locked; a lock file left by a killed build is reused, never trusted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK_NAME = ".medkd.lock"
LOG_NAME = "log.txt"
MANIFEST_NAME = "manifest.sha256"
# A segmentation build's per-stage checkpoints (stages/<stage>/) and overlay PNGs.
STAGES_DIR = "stages"
OVERLAYS_DIR = "overlays"


def check_location(run_dir: Path) -> None:
    """A run directory must be a directory, or creatable: checked before any work starts."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir} exists and is not a directory; pass run_dir=NEW_DIR")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create run directory {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write run directory {run_dir}: {existing} is read-only for this user; "
                        "pass run_dir=A_WRITABLE_PATH")


def lock_holder(run_dir: Path) -> str | None:
    """The PID (as written in the lock file) of the medkd command holding `run_dir`, else None."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing drops the shared lock, if we got it
    return None


def _acquire(run_dir: Path) -> int:
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"cannot lock run directory {run_dir} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run directory {run_dir} is in use by another medkd command (PID {holder}); "
                            "wait for it to finish or use another run directory") from None
        # The previous holder unlinks the file on release: if it did so between our open and
        # our flock, we locked an orphan inode and must lock the new file instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Create `run_dir` if needed and hold its exclusive lock for the duration of the block."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # reported as a full disk by the command
        raise UserError(f"cannot create run directory {run_dir} ({exc.strerror})") from None
    fd = _acquire(run_dir)
    try:
        yield run_dir
    finally:
        # Unlink while still holding the lock, so a waiter never locks a file we then delete.
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        os.close(fd)


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Temporary files of a killed command: the atomic writer's `.NAME.XXXX.tmp`, the export staging.

    Only call with the lock held: then nothing else is writing them.
    """
    from medkd.export.run_export import STAGING

    stale = [p for p in run_dir.rglob(".*.tmp") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    staging = run_dir / STAGING
    if staging.exists():
        shutil.rmtree(staging) if staging.is_dir() and not staging.is_symlink() else staging.unlink()
        stale.append(staging)
    return stale


def prepare(run_dir: Path, *, resume: bool, overwrite: bool, fingerprint: str) -> None:
    """Check the locked run directory and clear what the new build replaces.

    Checks first (an existing run needs resume/overwrite; a resume checkpoint must load and
    match `fingerprint`), so a refused build changes nothing. Then stale temporary files go,
    and so does the manifest: the run is changing, and it is written again when the build ends.
    `overwrite` removes the previous run's artifacts and its log.
    """
    from medkd.export.run_export import DEPLOYABLES, previous_artifacts, recorded_models

    from .checkpoint import CHECKPOINT_NAME, load_checkpoint

    # What a build writes besides the export's files (those are medkd.export.run_export's);
    # a segmentation build (seg_pipeline.py) also keeps per-stage checkpoints, the tuned
    # teacher and overlays.
    build_artifacts = ("config.yaml", CHECKPOINT_NAME, "student.safetensors", "report.json", "report.md",
                       STAGES_DIR, "teacher.safetensors", OVERLAYS_DIR)
    if any((run_dir / name).exists() for name in build_artifacts) and not (resume or overwrite):
        raise UserError(
            f"{run_dir} already holds a run; pass resume=true to continue it, "
            "overwrite=true to replace it, or run_dir=NEW_DIR"
        )
    if resume and not overwrite:
        for checkpoint in [run_dir / CHECKPOINT_NAME, *sorted(run_dir.glob(f"{STAGES_DIR}/*/{CHECKPOINT_NAME}"))]:
            if checkpoint.exists():
                load_checkpoint(checkpoint, fingerprint)  # unreadable or another config: UserError
    remove_stale_files(run_dir)
    doomed = [run_dir / MANIFEST_NAME]
    if overwrite:
        doomed += [run_dir / name for name in (*build_artifacts, LOG_NAME, DEPLOYABLES)]
        doomed += [path for model in recorded_models(run_dir) for path in previous_artifacts(run_dir, model)]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
