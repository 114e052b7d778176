"""`medkd-build recipe=tskd` end to end on tiny settings: stages, artifacts, report, resume,
the transfer set, and one-line errors for bad segmentation input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medkd.toolchain.cli import main
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_segmentation_task
from medkd.toolchain.pipeline import run
from medkd.toolchain.seg_pipeline import epochs_for_steps, transfer_set
from medkd.toolchain.verify_cli import main as verify

TINY = ["recipe=tskd", "data.image_size=32", "teacher.input_size=32", "data.max_train=8", "data.max_test=6",
        "recipe.teacher_steps=4", "recipe.distill_epochs=1", "recipe.finetune_steps=4", "recipe.batch_size=4",
        "transfer.copies=1", "progress=false", "export.precision=fp32", "export.calibration.images=4",
        "export.latency_runs=2", "export.latency_warmup=1", "export.latency_batches=[1]", "export.latency_threads=[1]"]


@pytest.fixture
def tiny(tmp_path):
    def overrides(*extra):
        return TINY + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *extra]

    return overrides


def test_tskd_tunes_the_teacher_distils_fine_tunes_and_reports_dice(tiny, tmp_path):
    report = run(load_config(tiny("export.precision=best")))  # int8 where the guard (on Dice) holds
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "student.safetensors", "teacher.safetensors", "report.json", "report.md", "log.txt",
                 "manifest.sha256", "stages/teacher/checkpoint.pt", "stages/distillation/checkpoint.pt",
                 "stages/fine_tuning/checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    test = report["segmentation"]["test"]
    assert set(test["per_class"]) == {"frontal", "insula-limbic", "occipital", "parietal", "subcortical",
                                      "temporal", "cerebellum"}
    assert 0 <= test["mean_dice"] <= 1 and test["mean_hd95_mm"] > 0
    assert all((run_dir / p).is_file() for p in report["segmentation"]["overlays"])
    teacher = report["teacher"]
    assert teacher["merge_parity"]["relative"] <= 1e-5 and len(teacher["history"]) == 2
    assert report["transfer_set"] == {"images": 16, "training_slices": 8, "augmented_copies": 8,
                                      "augment": "crop=0.8,rotate=10,jitter=0.1"}
    assert [len(h) for h in report["training"]["histories"].values()] == [1, 2]
    assert json.loads((run_dir / "report.json").read_text())["run"]["mode"] == "tskd"
    assert "| **mean** |" in (run_dir / "report.md").read_text()
    # The student goes through the classifiers' export path: parity per pixel, int8 guarded on Dice.
    export = report["export"]
    model = export["models"]["model"]
    assert export["metric"] == "dice" and (run_dir / model["deployed_file"]).is_file()
    assert model["formats"]["onnx"]["parity"]["max_abs_diff"] <= 1e-4
    assert model["formats"]["onnx"]["parity"]["top1_agreement"] >= 0.999
    assert set(model["test_metric"]) == {"fp32", "int8"} and 0 <= model["test_metric"]["fp32"] <= 1
    assert "Test Dice" in (run_dir / "report.md").read_text()
    assert verify([str(run_dir)]) == 0
    # A finished run resumes without training again: every stage's history is already complete.
    resumed = run(load_config(tiny("resume=true")))
    assert resumed["training"]["histories"] == report["training"]["histories"]
    assert resumed["segmentation"]["test"]["mean_dice"] == pytest.approx(test["mean_dice"])


def test_scratch_mode_trains_the_student_alone(tiny, tmp_path):
    report = run(load_config(tiny("recipe.mode=scratch")))
    assert report["teacher"] is None and list(report["training"]["histories"]) == ["fine_tuning"]
    assert not (tmp_path / "run" / "teacher.safetensors").exists()


def test_transfer_path_adds_its_images_to_the_transfer_set(tmp_path):
    folder = tmp_path / "generated"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 50 * i, dtype=np.uint8)).save(folder / f"g{i}.png")
    cfg = load_config(TINY + ["transfer.copies=0", f"transfer.path={folder}"])
    task = load_segmentation_task(cfg.data)
    parts, info = transfer_set(task, cfg)
    images = torch.cat(parts)
    assert info["extra_images"] == 3 and len(images) == len(task.train) + 3
    assert images.shape[1:] == (1, 32, 32)  # RGB files brought to the task's gray channel and size
    assert images[-1].mean().item() == pytest.approx(100 / 255, abs=1e-3)
    plain, _ = transfer_set(task, load_config(TINY + ["transfer.copies=0"]))
    assert [len(part) for part in plain] == [len(task.train)]


@pytest.mark.parametrize("extra, fragment", [
    (["data=mri"], "not a segmentation data set"),
    (["recipe.mode=fancy"], "recipe.mode must be one of"),
    (["transfer.copies=-1"], "transfer.copies must be a non-negative integer"),
    (["transfer.path=/nonexistent/folder"], "is not a folder of images"),
    (["teacher=efficientnet-lite0"], "teacher=litemedsam"),
])
def test_bad_tskd_settings_exit_2_with_one_line_and_write_nothing(tiny, tmp_path, capsys, extra, fragment):
    assert main(tiny(*extra)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_masks_that_do_not_fit_their_images_stop_the_build_before_it_writes(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    images = np.zeros((4, 16, 16), dtype=np.uint8)
    np.savez(path, train_images=images, train_masks=np.zeros((4, 16, 15), dtype=np.int64),
             test_images=images, test_masks=np.zeros((4, 16, 16), dtype=np.int64))
    assert main(TINY + ["data=seg-npz", f"data.path={path}", f"run_dir={tmp_path / 'run'}"]) == 1  # a data error
    err = capsys.readouterr().err.strip()
    assert "every image needs a mask of its own size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps, images, batch, epochs", [
    (144, 70, 4, 8),   # the default: 18 steps an epoch
    (144, 10, 4, 48),  # 10 labelled slices: 3 steps an epoch, as many steps in all
    (216, 70, 4, 12),
    (5, 8, 4, 3),      # rounded up to whole epochs
    (1, 100, 4, 1),
])
def test_labelled_stages_train_the_same_steps_whatever_the_budget(steps, images, batch, epochs):
    assert epochs_for_steps(steps, images, batch) == epochs
