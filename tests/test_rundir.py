"""The run directory never lies: one writer at a time, checks before any write, clean failures.

One small build (kd, EfficientNet-Lite0 teacher, 1 epoch) is shared by the tests that need a
finished run; everything else fails before training and costs a data load at most.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medkd.toolchain import checkpoint as checkpoint_module
from medkd.toolchain import pipeline
from medkd.toolchain import rundir
from medkd.toolchain.cli import main
from medkd.toolchain.export_cli import main as export_main
from medkd.toolchain.resource_errors import resource_error
from medkd.toolchain.verify_cli import main as verify_main

from test_pipeline import SMALL

# Later overrides win: one epoch, fewer images, the teacher at 64 px (8x less work than 224).
BUILD = SMALL + ["train.epochs=1", "export.latency_batches=[1]", "data.max_train=64", "data.max_test=32",
                 "teacher.input_size=64"]
UMASK = 0o027  # not the usual 022, so a hard-coded 0644 could not pass


def overrides(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return BUILD + [f"run_dir={run_dir}", f"cache_dir={cache_dir}", *extra]


@pytest.fixture
def small(tmp_path):
    def make(*extra):
        return overrides(tmp_path / "run", tmp_path / "cache", *extra)

    return make


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A kd build with overwrite=true over a run killed mid-way (stale temp files, old log)."""
    root = tmp_path_factory.mktemp("finished")
    run_dir, cache_dir = root / "run", root / "cache"
    previous = os.umask(UMASK)
    try:
        (run_dir / "firmware").mkdir(parents=True)
        (run_dir / "report.json").write_text("{}")  # a previous run: refused without overwrite/resume
        (run_dir / "log.txt").write_text("OLD LOG LINE\n")
        (run_dir / ".student.safetensors.k1ll3d.tmp").write_bytes(b"half")
        (run_dir / "firmware" / ".medkd_model.bin.k1ll3d.tmp").write_bytes(b"half")
        (run_dir / ".export.staging").mkdir()
        (run_dir / ".export.staging" / "model.onnx").write_bytes(b"half")
        assert main(overrides(run_dir, cache_dir, "recipe=kd", "overwrite=true")) == 0
    finally:
        os.umask(previous)
    return run_dir, cache_dir


def test_overwrite_clears_stale_temp_files_and_starts_a_fresh_log(finished):
    run_dir, _ = finished
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / ".export.staging").exists()
    log = (run_dir / "log.txt").read_text()
    assert "OLD LOG LINE" not in log and log.startswith("data: ")
    assert not (run_dir / rundir.LOCK_NAME).exists()  # released and removed at the end


def test_every_artifact_and_cache_file_respects_the_umask(finished):
    run_dir, cache_dir = finished
    files = [p for top in finished for p in [top, *top.rglob("*")]]
    assert {"student.safetensors", "report.md", "report.json", "checkpoint.pt", "manifest.sha256"} <= {
        p.name for p in files}
    assert any(p.suffix == ".safetensors" for p in cache_dir.iterdir())  # the teacher-feature cache
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~UMASK}
    assert wrong == {}


def test_manifest_covers_the_run_and_medkd_verify_checks_it(finished, tmp_path, capsys):
    run_dir, _ = finished
    listed = (run_dir / "manifest.sha256").read_text().splitlines()
    on_disk = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()
                     and p.name not in ("manifest.sha256", "log.txt"))
    assert [line.split("  ", 1)[1] for line in listed] == on_disk
    model = next(line for line in listed if line.endswith("  model.onnx"))
    assert model.split()[0] == hashlib.sha256((run_dir / "model.onnx").read_bytes()).hexdigest()
    assert verify_main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"{run_dir}: ok {len(on_disk)} files"

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with (copy / "report.md").open("a") as handle:
        handle.write("edited\n")
    (copy / "model.onnx").unlink()
    (copy / "plots" / "extra.png").write_bytes(b"x")
    (copy / "log.txt").write_text("the log is not pinned\n")
    assert verify_main([str(copy)]) == 1
    err = one_line_error(capsys)
    assert err.endswith("changed: report.md; missing: model.onnx; extra: plots/extra.png")


def test_report_records_where_the_run_came_from(finished):
    import json

    from medkd.toolchain.config import load_config
    from medkd.toolchain.data import load_task
    from medkd.toolchain.models.teachers import efficientnet_lite0_weights_path
    from medkd.toolchain.provenance import SOURCE_ROOT, data_digest

    run_dir, cache_dir = finished
    provenance = json.loads((run_dir / "report.json").read_text())["provenance"]
    head = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert provenance["medkd_source"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    weights = efficientnet_lite0_weights_path().read_bytes()
    assert provenance["teacher_weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    # The digest is of the data the run used: loading it again gives the same one.
    cfg = load_config(overrides(run_dir, cache_dir, "recipe=kd"))
    assert provenance["data"]["sha256"] == data_digest(load_task(cfg.data))["sha256"]
    md = (run_dir / "report.md").read_text()
    assert provenance["data"]["sha256"] in md and provenance["teacher_weights"]["sha256"] in md


HOLD_LOCK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from medkd.toolchain.rundir import locked
    with locked(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills us)
""")


def test_a_second_command_is_refused_while_one_holds_the_run(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(overrides(run_dir, finished[1], "recipe=kd", "overwrite=true")) == 1
        err = one_line_error(capsys)
        assert f"run directory {run_dir} is in use by another medkd command (PID {holder.pid})" in err
        assert export_main([str(run_dir), "target=jetson-orin"]) == 1
        assert f"(PID {holder.pid})" in one_line_error(capsys)
        assert verify_main([str(run_dir)]) == 1
        assert "being written" in one_line_error(capsys)
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.LOCK_NAME}
        assert after == before  # the refused overwrite deleted nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    assert (run_dir / rundir.LOCK_NAME).exists()  # left behind by the killed holder, not trusted
    assert verify_main([str(run_dir)]) == 0
    with rundir.locked(run_dir):
        assert (run_dir / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("damage, fragment", [
    (lambda path: path.write_bytes(b"not a checkpoint"), "is corrupt or unreadable"),
    (lambda path: checkpoint_module.save_checkpoint(path.parent, {"config_fingerprint": "0" * 16}),
     "was written with a different training config"),
])
def test_resume_checkpoint_is_checked_before_features_and_before_any_write(tmp_path, monkeypatch, capsys,
                                                                          damage, fragment):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the previous run's config\n")
    damage(run_dir / "checkpoint.pt")

    def no_features(*args, **kwargs):
        raise AssertionError("teacher features computed before the checkpoint was checked")

    monkeypatch.setattr(pipeline, "teacher_features", no_features)
    assert main(overrides(run_dir, tmp_path / "cache", "recipe=kd", "resume=true")) == 1
    assert fragment in one_line_error(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.yaml"]  # no log, no lock
    assert (run_dir / "config.yaml").read_text() == "the previous run's config\n"


def test_resume_removes_stale_temp_files_and_the_manifest_but_keeps_the_log(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "plots").mkdir(parents=True)
    stale = [run_dir / ".checkpoint.pt.a1b2c3.tmp", run_dir / "plots" / ".model-latency.png.d4e5.tmp",
             run_dir / ".export.staging" / "model.onnx"]
    stale[2].parent.mkdir()
    for path in stale:
        path.write_bytes(b"half written")
    kept = {run_dir / "log.txt": "epoch 1\n", run_dir / "notes.tmp": "a user's file\n",
            run_dir / "report.json": "{}"}
    for path, text in kept.items():
        path.write_text(text)
    (run_dir / "manifest.sha256").write_text("")
    with rundir.locked(run_dir):
        rundir.prepare(run_dir, resume=True, overwrite=False, fingerprint="unused: no checkpoint")
    assert not any(p.exists() for p in stale) and not (run_dir / ".export.staging").exists()
    assert not (run_dir / "manifest.sha256").exists()  # the run changes; a new one comes at the end
    assert {p: p.read_text() for p in kept} == kept


def test_run_dir_that_is_a_file_is_refused_before_any_work(small, tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("a file")
    assert main(small("recipe=scratch")) == 1
    assert f"run_dir {target} exists and is not a directory" in one_line_error(capsys)
    assert main(overrides(target / "inner", tmp_path / "cache", "recipe=scratch")) == 1
    assert f"{target} is not a directory" in one_line_error(capsys)
    assert target.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so nothing would be refused")
def test_read_only_parent_is_a_one_line_error(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(BUILD + [f"run_dir={parent / 'run'}", "recipe=scratch"]) == 1
        assert f"{parent} is read-only" in one_line_error(capsys)
    finally:
        parent.chmod(0o755)
    assert not (parent / "run").exists()


def test_unwritable_parent_message_as_seen_by_a_non_root_user(tmp_path, monkeypatch, capsys):
    # The same check as above, with the permission answer a normal user would get (runs as root too).
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    assert main(BUILD + [f"run_dir={tmp_path / 'ro' / 'run'}", "recipe=scratch"]) == 1
    assert f"cannot write run directory {tmp_path / 'ro' / 'run'}: {tmp_path} is read-only" in one_line_error(capsys)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs the /dev/full device")
def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_file(small, tmp_path, monkeypatch, capsys):
    real_save = checkpoint_module.torch.save

    def save_to_full_disk(obj, handle):  # the kernel's real ENOSPC, through torch's writer
        with open("/dev/full", "wb") as full:
            real_save(obj, full)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_to_full_disk)
    assert main(small("recipe=scratch")) == 1
    err = one_line_error(capsys)
    assert f"disk full while writing the run directory {tmp_path / 'run'} (No space left on device)" in err
    assert "resume=true" in err
    leftovers = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert leftovers == ["config.yaml", "log.txt"]  # no .checkpoint.pt.*.tmp, no lock


def test_absurd_image_size_runs_out_of_memory_with_a_one_line_error(tmp_path):
    # A real allocation failure: address space capped a little above what the imports took,
    # then 1024 px images (~17 GB for the MRI set as float32) are asked for.
    script = textwrap.dedent("""
        import resource, sys
        from medkd.toolchain import cli, pipeline  # torch and friends, before the cap
        vm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
        cap = (vm_kib << 10) + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        sys.exit(cli.main(sys.argv[1:]))
    """)
    args = BUILD + [f"run_dir={tmp_path / 'run'}", "recipe=scratch", "data.max_train=32", "data.max_test=8",
                    "data.image_size=1024", "train.batch_size=32", "threads=1"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("medkd-build: error: out of memory") and "data.image_size" in lines[0]


@pytest.mark.parametrize("exc, expected", [
    (MemoryError(), "out of memory; use smaller settings: S"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 17616076800 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory (an allocation of 17.6 GB failed); use smaller settings: S"),
    (torch.OutOfMemoryError("allocation on device 0 failed"), "out of memory; use smaller settings: S"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.onnx"),
     "disk full while writing /runs/x/model.onnx (No space left on device); free some space, then R"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"),
     "disk full while writing W (Disk quota exceeded); free some space, then R"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "disk full while writing W; free some space, then R"),
    (RuntimeError("shape mismatch"), None),
    (OSError(errno.EACCES, "Permission denied"), None),
])
def test_resource_errors_are_recognised_by_errno_type_and_message(exc, expected):
    error = resource_error(exc, "W", "R", "S")
    assert (None if error is None else str(error)) == expected


def test_a_full_disk_behind_another_exception_is_still_found():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as exc:
        assert str(resource_error(exc, "W", "R", "S")).startswith("disk full while writing W")
