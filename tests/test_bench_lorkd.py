"""bench/lorkd.py's pieces on a tiny synthetic two-task data set (a few training steps only)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from medkd.recipes import UNLABELLED
from medkd.toolchain.config import load_config
from medkd.toolchain.data.base import ImageSet, TaskData, TaskInfo



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on the shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("lorkd")


def _split(per_task: list[int], classes: list[int], offsets: list[int], size: int, gen) -> ImageSet:
    labels, ids = [], []
    for t, (n, k, off) in enumerate(zip(per_task, classes, offsets)):
        labels.append(torch.arange(n) % k + off)
        ids.append(torch.full((n,), t, dtype=torch.int64))
    labels, ids = torch.cat(labels), torch.cat(ids)
    return ImageSet(torch.rand(len(labels), 1, size, size, generator=gen), labels, ids)


@pytest.fixture(scope="module")
def task():
    """Task a: 2 classes, 20 train / 6 test; task b: 3 classes, 30 train / 9 test; 16 px gray."""
    gen = torch.Generator().manual_seed(0)
    infos = [TaskInfo("a", ("a0", "a1"), 0), TaskInfo("b", ("b0", "b1", "b2"), 2)]
    train = _split([20, 30], [2, 3], [0, 2], 16, gen)
    test = _split([6, 9], [2, 3], [0, 2], 16, gen)
    names = ["a:a0", "a:a1", "b:b0", "b:b1", "b:b2"]
    return TaskData("multitask", train, test, names, {}, None, infos)


@pytest.fixture(scope="module")
def cfg():
    return load_config(["student=mobilenetv3", "train.epochs=1", "train.batch_size=16", "progress=false"])


def test_task_slice_is_task_view_at_full_labels(bench, task):
    for t, info in enumerate(task.tasks):
        own, mine = bench.task_slice(task, task.train, t)
        view = task.task_view(info.name).train
        assert torch.equal(own.images, view.images) and torch.equal(own.labels, view.labels)
        assert torch.equal(task.train.task_ids[mine], torch.full((len(mine),), t))


def test_scarce_set_keeps_the_same_labels_for_every_method(bench, task):
    kd, kd_index = bench.scarce_multitask_set(task, 0.2, 1, "kd")
    scratch, scratch_index = bench.scarce_multitask_set(task, 0.2, 1, "scratch")
    # kd keeps every image (the transfer set), with 20% of each class labelled (rounded half up):
    # task a 2 classes x 10 images -> 2 each; task b 3 classes x 10 -> 2 each.
    assert len(kd) == 50 and torch.equal(kd_index, torch.arange(50))
    labelled = kd.labels != UNLABELLED
    assert int(labelled.sum()) == 10
    assert int((labelled & (kd.task_ids == 0)).sum()) == 4
    # scratch sees exactly those labelled images, with their labels and task ids
    assert torch.equal(scratch_index, torch.nonzero(labelled).flatten())
    assert torch.equal(scratch.labels, kd.labels[labelled]) and torch.equal(scratch.task_ids, kd.task_ids[labelled])
    # task-local labels after slicing, UNLABELLED kept
    own, _ = bench.task_slice(task, kd, 1)
    assert set(own.labels.tolist()) <= {UNLABELLED, 0, 1, 2} and int((own.labels == UNLABELLED).sum()) == 24


def test_epochs_follow_the_distill_rule(bench):
    small = ImageSet(torch.zeros(10, 1, 4, 4), torch.zeros(10, dtype=torch.int64))
    assert bench.epochs_for(12, 10, small) == 12
    assert bench.epochs_for(12, 25, small) == 30  # 2.5 x
    assert bench.epochs_for(12, 100, small) == 36  # capped at 3 x


def test_freeze_experts_gives_exactly_the_shared_model(bench, task, cfg):
    feats = torch.randn(len(task.train), 8)
    shared = bench.run_multitask(cfg, "shared", task, task.train, feats, seed=0, epochs=1)
    lorkd = bench.run_multitask(cfg, "lorkd", task, task.train, feats, seed=0, epochs=1)
    assert set(shared["per_task"]) == {"a", "b"}
    assert all(0.0 <= acc <= 1.0 for acc in lorkd["per_task"].values())
    # stored: lorkd = shared + experts; per device both are one fused backbone + the larger head
    assert lorkd["expert_params"] > 0 and shared["expert_params"] == 0
    assert lorkd["stored_params"] == shared["stored_params"] + lorkd["expert_params"]
    assert lorkd["per_device_params"] == shared["per_device_params"]
    fused = bench.build_student(cfg.student, 3, 1, 16)
    assert shared["per_device_params"] == bench.parameter_count(fused)


def test_frozen_experts_stay_zero_through_training(bench, task, cfg):
    from medkd.recipes import build_recipe
    from medkd.toolchain.train import TrainSettings, fit

    torch.manual_seed(0)
    student = bench.build_student(cfg.student, task.num_classes, 1, 16)
    recipe = build_recipe(load_config(["recipe=lorkd"]).recipe, student, 8, tasks=task.tasks)
    frozen = bench.freeze_experts(recipe)
    assert frozen == recipe.student.parameter_counts()["experts"]
    with tempfile.TemporaryDirectory() as run_dir:
        fit(recipe, task.train, None, TrainSettings(1, 16, 0.01, 0.05, 0, False), Path(run_dir), "t",
            torch.randn(len(task.train), 8), log=lambda line: None)
    for _, layer in recipe.student.modules_with_experts():
        assert torch.count_nonzero(layer.lora_B) == 0  # weight decay cannot move a zero
        assert all(torch.count_nonzero(layer.delta(t)) == 0 for t in range(2))


def test_per_task_models_sum_their_sizes(bench, task, cfg):
    feats = torch.randn(len(task.train), 8)
    row = bench.run_per_task(cfg, "scratch", task, task.train, feats, torch.randn(len(task.test), 8),
                             {"a": 20, "b": 30}, seed=0, base_epochs=1)
    sizes = [bench.parameter_count(bench.build_student(cfg.student, k, 1, 16)) for k in (2, 3)]
    assert row["stored_params"] == sum(sizes) and row["per_device_params"] == max(sizes)
    assert row["epochs"] == {"a": 1, "b": 1}


def test_teacher_probe_scores_each_task_on_its_own_test_images(bench, task):
    # features = one-hot of the task-local label (+ noise): a linear probe separates them
    def feats(images: ImageSet):
        local = task.local_labels(images)
        return torch.nn.functional.one_hot(local, 3).float() * 5 + 0.01 * torch.randn(len(local), 3)

    scores = bench.teacher_probe_accuracy(task, task.train, feats(task.train), feats(task.test), seed=0)
    assert scores == {"a": 1.0, "b": 1.0}
    shuffled = feats(task.test)[torch.randperm(len(task.test), generator=torch.Generator().manual_seed(1))]
    worse = bench.teacher_probe_accuracy(task, task.train, feats(task.train), shuffled, seed=0)
    assert worse["b"] < 1.0


def test_summary_means_and_table(bench):
    rows = [
        {"fraction": 1.0, "method": "lorkd", "seed": s, "per_task": {"a": a, "b": b},
         "stored_params": 2_000_000, "per_device_params": 1_500_000, "train_seconds": sec}
        for s, a, b, sec in ((0, 0.5, 0.7, 10.0), (1, 0.7, 0.9, 20.0))
    ]
    summary = bench.summarise([bench.with_mean(r) for r in rows], ["a", "b"])
    (entry,) = summary
    assert entry["a"]["mean"] == pytest.approx(0.6) and entry["a"]["std"] == pytest.approx(0.1414213, abs=1e-6)
    assert entry["mean"]["mean"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2, then over seeds
    assert entry["train_seconds"] == 15.0
    lines = bench.table_lines(summary, ["a", "b"])
    assert lines[2] == "| 100% | lorkd | 2 | 0.600 ± 0.141 | 0.800 ± 0.141 | 0.700 ± 0.141 | 2.00M | 1.50M | 15 |"


def test_protocol_gaps_say_what_was_left_out(bench):
    full_rows = [{"fraction": f, "seed": s, "method": m}
                 for f in (1.0, 0.1) for s in (0, 1, 2) for m in bench.METHODS]
    plain = {"epochs": None, "max_train": None, "max_test": None}
    assert bench.protocol_gaps(full_rows, plain, 12) == []
    assert bench.protocol_gaps(full_rows, {**plain, "epochs": 12}, 12) == []
    some = [r for r in full_rows if r["seed"] == 0 and not (r["fraction"] == 0.1 and r["method"] == "scratch")]
    gaps = bench.protocol_gaps(some, {**plain, "epochs": 6}, 12)
    assert gaps == ["100% labels, seed 1: not run", "100% labels, seed 2: not run",
                    "10% labels, seed 0: scratch not run", "10% labels, seed 1: not run",
                    "10% labels, seed 2: not run", "6 epochs instead of the config's 12"]


def test_resume_refuses_results_measured_otherwise(bench, tmp_path):
    out = tmp_path / "lorkd.json"
    args = bench.parse_args(["--resume", "--output", str(out), "--epochs", "3"])
    assert bench.load_previous(args) is None  # nothing to resume yet
    out.write_text(json.dumps({"settings": bench.run_settings(args), "runs": [{"method": "kd"}]}))
    assert bench.load_previous(args)["runs"] == [{"method": "kd"}]
    other = bench.parse_args(["--resume", "--output", str(out), "--epochs", "4"])
    with pytest.raises(SystemExit, match="measured with"):
        bench.load_previous(other)
    assert bench.load_previous(bench.parse_args(["--output", str(out)])) is None  # no --resume: start afresh


def test_augmented_views_and_their_features_follow_every_subset(bench, task, cfg):
    """With augmentation each image keeps its own K views and their teacher features, in the
    multi-task students and in every per-task student."""
    from medkd.toolchain.data.augment import draw_view_table, parse_augment

    views = draw_view_table([parse_augment("hflip,rotate=10")] * len(task.train), 2, seed=0)
    feats = torch.randn(2, len(task.train), 8)
    index = torch.tensor([3, 25, 7])
    sub_feats, sub_views = bench.subset(feats, views, index)
    assert torch.equal(sub_feats, feats[:, index]) and torch.equal(sub_views.params, views.params[:, index])
    assert bench.subset(feats[0], None, index)[1] is None
    lorkd = bench.run_multitask(cfg, "lorkd", task, task.train, feats, seed=0, epochs=1, views=views)
    assert set(lorkd["per_task"]) == {"a", "b"}
    row = bench.run_per_task(cfg, "kd", task, task.train, feats, torch.randn(len(task.test), 8),
                             {"a": 20, "b": 30}, seed=0, base_epochs=1, views=views)
    assert set(row["per_task"]) == {"a", "b"}
    with pytest.raises(ValueError, match="views of 3 images"):  # views of other images: refused, not mixed up
        bench.run_multitask(cfg, "lorkd", task, task.train, feats, seed=0, epochs=1,
                            views=bench.subset(feats, views, index)[1])
