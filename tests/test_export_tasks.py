"""One fused model per task: the task switch (export.task), per-task data, deployables.json."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medkd.export.run_export import DEPLOYABLES, recorded_models
from medkd.toolchain.config import load_config
from medkd.toolchain.data.base import ImageSet, TaskData, TaskInfo
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.export_stage import check_export_task, make_plan, run_export

FAST = ["export.latency_runs=2", "export.latency_warmup=0", "export.latency_batches=[1]",
        "export.latency_threads=[1]", "export.calibration.images=8", "export.validation_images=16",
        "export.precision=fp32", "target=cpu"]


def two_tasks() -> TaskData:
    """Task 'bright' (2 classes) and task 'dark' (3 classes); labels are global ids."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        task_ids = torch.arange(n) % 2
        local = torch.where(task_ids == 0, torch.arange(n) % 2, torch.arange(n) % 3)
        labels = torch.where(task_ids == 0, local, local + 2)
        images = torch.rand(n, 1, 8, 8, generator=g) * 0.5 + 0.5 * (task_ids == 0).float().view(-1, 1, 1, 1)
        return ImageSet(images, labels, task_ids)

    tasks = [TaskInfo("bright", ("b0", "b1"), 0), TaskInfo("dark", ("d0", "d1", "d2"), 2)]
    return TaskData("toy", split(64), split(24), ["bright:b0", "bright:b1", "dark:d0", "dark:d1", "dark:d2"],
                    tasks=tasks)


def head(classes: int) -> nn.Module:
    torch.manual_seed(classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))


def test_each_task_model_is_exported_checked_and_tested_on_its_own_task(tmp_path):
    task = two_tasks()
    cfg = load_config(FAST)
    lines = []
    section = run_export(cfg, tmp_path, task, {"bright": head(2), "dark": head(3)}, make_plan(cfg, task),
                         lines.append, False)
    models = section["models"]
    assert set(models) == {"bright", "dark"}
    # Each model saw only its own task's images: 32 training images each, half of the 64.
    assert models["bright"]["validation_images"] + models["bright"]["calibration_images"] <= 32
    assert (tmp_path / "bright.onnx").is_file() and (tmp_path / "dark.onnx").is_file()
    index = json.loads((tmp_path / DEPLOYABLES).read_text())
    assert index["dark"]["deployed_file"] == "dark.onnx" and index["bright"]["onnx"] == {"fp32": "bright.onnx"}
    assert recorded_models(tmp_path) == ["bright", "dark", "model"]
    # A 3-class model scored against 2-class labels would raise or mis-score: check the metric
    # equals a direct evaluation on the task's own test images.
    dark_test = task.task_view("dark").test
    expected = (head(3)(dark_test.images).argmax(1) == dark_test.labels).float().mean().item()
    assert models["dark"]["test_metric"]["fp32"] == pytest.approx(expected)


def test_the_task_switch_exports_one_task(tmp_path):
    task = two_tasks()
    cfg = load_config([*FAST, "export.task=dark"])
    section = run_export(cfg, tmp_path, task, {"bright": head(2), "dark": head(3)}, make_plan(cfg, task),
                         lambda line: None, False)
    assert list(section["models"]) == ["dark"] and not (tmp_path / "bright.onnx").exists()


def test_unknown_or_misplaced_export_task_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown export.task 'drak'.*did you mean 'dark'.*all or one of: bright, dark"):
        check_export_task(load_config(["export.task=drak"]), two_tasks())
    single = TaskData("one", two_tasks().train, two_tasks().test, ["a"] * 5)
    with pytest.raises(ConfigError, match="needs multi-task data"):
        check_export_task(load_config(["export.task=dark"]), single)


def test_task_names_become_c_identifiers_for_firmware():
    from medkd.export.exporter import firmware_symbol

    assert firmware_symbol("fashion-mnist") == "medkd_fashion_mnist"
    assert firmware_symbol("model") == "medkd_model"


def test_guard_images_are_the_held_out_split_when_there_is_one():
    from medkd.toolchain.export_stage import export_data

    task = two_tasks()
    single = TaskData("one", ImageSet(task.train.images, task.train.labels), ImageSet(task.test.images,
                      task.test.labels), list(task.class_names))
    held_out = ImageSet(torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4]))
    plan = make_plan(load_config([*FAST, "export.precision=int8"]), single)
    data = export_data(single, plan, seed=0, held_out=held_out)
    assert torch.equal(torch.from_numpy(data.validation_images), held_out.images)
    assert data.validation_labels.tolist() == [0, 1, 2, 3, 4]
    assert len(data.calibration) == 8  # calibration still comes from the training images
    fitted = export_data(single, plan, seed=0)
    assert len(fitted.validation_labels) == 16 and not any(
        torch.equal(torch.from_numpy(img), held_out.images[0]) for img in fitted.validation_images)
