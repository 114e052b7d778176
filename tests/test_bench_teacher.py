"""bench/teacher.py's build comparison on hand-made build reports (no build runs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("teacher")


def _report(teacher_seconds: float, wall: float, accuracy: float) -> dict:
    return {
        "run": {"stage_seconds": {"teacher_features": teacher_seconds, "training": 200.0}, "wall_time_s": wall},
        "training": {"test_accuracy": accuracy, "teacher_test_accuracy": 0.8},
        "export": {"models": {"student": {"deployed_precision": "fp16", "deployed_file": "model.fp16.onnx"}}},
    }


def test_report_summary_names_what_each_deployable_shipped_as(bench):
    summary = bench.report_summary(_report(100.0, 400.0, 0.85))
    assert summary["deployed"] == {"student": "fp16"}
    assert summary["stage_seconds"]["teacher_features"] == 100.0
    assert summary["wall_time_s"] == 400.0 and summary["test_accuracy"] == 0.85


def _goals(bench, torch_report: dict, ort_report: dict) -> dict:
    builds = {"torch": bench.report_summary(torch_report), "onnxruntime": bench.report_summary(ort_report)}
    return {goal["goal"]: goal for goal in bench.build_goals(builds)}


def test_goals_compare_the_teacher_stage_not_the_whole_build(bench):
    goals = _goals(bench, _report(300.0, 600.0, 0.85), _report(100.0, 400.0, 0.85))
    teacher, build, accuracy = goals.values()
    assert teacher["measured"] == "3.00x" and teacher["met"]  # 300 / 100, though the builds differ 1.5x
    assert build["measured"] == "400 s" and not build["met"]  # the onnxruntime build's wall time vs 60 s
    assert accuracy["met"]  # equal accuracy counts as "same or better"


def test_goals_flag_a_slower_teacher_stage_and_an_accuracy_loss(bench):
    goals = _goals(bench, _report(290.0, 600.0, 0.85), _report(100.0, 50.0, 0.84))
    teacher, build, accuracy = goals.values()
    assert teacher["measured"] == "2.90x" and not teacher["met"]
    assert build["met"]  # 50 s is within the 60 s goal
    assert accuracy["measured"] == "-1.00 points" and not accuracy["met"]


def test_no_goals_when_a_build_failed(bench):
    builds = {"torch": {"backend": "torch", "error": "boom"}, "onnxruntime": bench.report_summary(_report(1, 1, 1))}
    assert bench.build_goals(builds) == []


def test_gflop_per_image_counts_one_images_multiply_adds_twice(bench):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, bias=False)  # 1x5x5 -> 2x3x3: 18 outputs x 9 MACs
            self.fc = torch.nn.Linear(18, 4)  # 18 x 4 MACs

        def extract(self, x):
            return self.fc(self.conv(x).flatten(1))

    assert bench.gflop_per_image(Tiny(), (1, 5, 5)) * 1e9 == 2 * (18 * 9 + 18 * 4)
