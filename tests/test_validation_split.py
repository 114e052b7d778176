"""The validation split carved from the training side (train.val_fraction, train.val_split):
whole axial slabs plus guard slabs on mri and ct (checked voxel by voxel against the patch
footprints), per-class random elsewhere, and what that does to the unlabelled transfer set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medkd.toolchain.cli import main
from medkd.toolchain.config import load_config
from medkd.toolchain.data import ct, fashion_mnist, load_task, mri, sampling
from medkd.toolchain.data.base import NO_SPATIAL_GROUP, ImageSet, TaskData, TaskInfo
from medkd.toolchain.data.mri_volume import DEFAULT_DIR as MRI_DIR
from medkd.toolchain.data.mri_volume import read_mri_volume
from medkd.toolchain.data.val_split import split_validation
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.pipeline import run
from medkd.toolchain.pipeline import split_validation as pipeline_split

needs_mri = pytest.mark.skipif(not (MRI_DIR / "ch2.nii.gz").is_file(),
                               reason="Debian package mricron-data not installed (no ch2.nii.gz)")
needs_ct = pytest.mark.skipif(not ct.DEFAULT_PATH.is_file(),
                              reason=f"Debian package invesalius-examples not installed (no {ct.DEFAULT_PATH})")
needs_fashion = pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (no /usr/share/datasets/fashion-mnist)",
)


def indexed(labels: torch.Tensor, groups: torch.Tensor | None, name: str = "t", **extra) -> TaskData:
    """A task whose image i is the constant i: what the split keeps maps back to positions."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    train = ImageSet(images, labels, extra.pop("task_ids", None), groups)
    test = ImageSet(torch.zeros(2, 1, 1, 1), labels[:2].clone())
    classes = [f"c{k}" for k in range(int(labels.max()) + 1)]
    return TaskData(name, train, test, classes, {"split_rule": "as loaded"}, **extra)


def rows(images: ImageSet | torch.Tensor | None) -> np.ndarray:
    if images is None:
        return np.zeros(0, dtype=np.int64)
    tensor = images.images if isinstance(images, ImageSet) else images
    return tensor.flatten(1)[:, 0].long().numpy()


def capped(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    return sampling.stratified_cap(labels, per_class * (labels.max() + 1), seed, "max_train")


# ---------------------------------------------------------------- the slab rule on its own


def test_slab_roles_mark_validation_and_one_guard_slab_either_side_per_volume():
    groups = np.array([3, 4, 5, 6, 7, 5, 5, NO_SPATIAL_GROUP])
    volumes = np.array([0, 0, 0, 0, 0, 1, 0, 0])
    roles = sampling.slab_roles(groups, volumes, np.array([[0, 5]]))
    t, v, g = sampling.TRAIN, sampling.VALIDATION, sampling.GUARD
    # Slab 5 of volume 1 is another volume's slab: training. No position: training.
    assert roles.tolist() == [t, g, v, g, t, t, v, t]


def test_class_living_in_two_neighbouring_slabs_stays_in_training_only():
    # Class 1 lies in slabs 10 and 11 only: holding either out guards the other.
    labels = np.array([0] * 40 + [1] * 6)
    groups = np.concatenate([np.repeat(np.arange(20), 2), [10, 10, 10, 11, 11, 11]])
    held = sampling.spatial_holdout(labels, groups, None, 0.2, seed=0)
    roles = sampling.slab_roles(groups, None, held)
    assert (roles[labels == 1] == sampling.TRAIN).all()
    assert (roles[labels == 0] == sampling.VALIDATION).sum() >= 1
    assert (roles[labels == 0] == sampling.TRAIN).sum() >= 1


def test_an_unknown_or_impossible_rule_is_a_one_line_config_error():
    labels = torch.tensor([0, 1] * 10)
    for task, rule, fragment in [
        (indexed(labels, None), "slabs", "must be one of auto, spatial, random"),
        (indexed(labels, None, "fashion-mnist"), "spatial", "fashion-mnist has none"),
    ]:
        with pytest.raises(ConfigError) as info:
            split_validation(task, 0.2, 0, rule)
        assert fragment in str(info.value) and "\n" not in str(info.value)
    # Multi-task: every task needs positions for `spatial`; the message names the one without.
    mixed = indexed(labels, torch.tensor([3] * 10 + [NO_SPATIAL_GROUP] * 10),
                    task_ids=torch.tensor([0] * 10 + [1] * 10),
                    tasks=[TaskInfo("mri", ("c0",), 0), TaskInfo("fashion-mnist", ("c1",), 1)])
    with pytest.raises(ConfigError, match="task.s. fashion-mnist have none"):
        split_validation(mixed, 0.2, 0, "spatial")


# ---------------------------------------------------------------- mri: footprints


@pytest.fixture(scope="module")
def mri_plan():
    volume = read_mri_volume()
    task, centres = mri.build_mri_task(volume, seed=0, image_size=8)
    return volume, task, centres["train"]


def footprints_mri(volume, centres: np.ndarray) -> np.ndarray:
    size = pad = mri.PATCH_MM
    mask = np.zeros(tuple(n + 2 * pad for n in volume.t1.shape[:2]) + volume.t1.shape[2:], dtype=bool)
    for (x0, y0), z in zip(mri.footprint_start(centres) + pad, centres[:, 2]):
        mask[x0 : x0 + size, y0 : y0 + size, z] = True
    return mask


@needs_mri
def test_mri_validation_patches_share_no_voxel_and_no_neighbouring_slice_with_training(mri_plan):
    volume, full, centres = mri_plan
    # The groups the loader sets are the slabs of the patch centres.
    assert torch.equal(full.train.spatial_group, torch.from_numpy(centres[:, 2] // mri.SLAB_MM))
    assert full.test.spatial_group is None
    keep = capped(full.train.labels.numpy(), 50)
    task = indexed(full.train.labels[keep], full.train.spatial_group[keep])
    held = split_validation(task, 0.15, seed=0)
    val, train = centres[keep][rows(held.val)], centres[keep][rows(held.task.train)]
    assert held.rule == "spatial" and held.summary["guard_dropped"] > 0
    assert not (footprints_mri(volume, val) & footprints_mri(volume, train)).any()
    # Not even neighbouring candidate slices: at least a guard slab (6 mm) between them.
    gaps = np.abs(val[:, 2][:, None] - train[:, 2][None, :])
    assert gaps.min() >= 6
    labels_val, labels_train = task.train.labels.numpy()[rows(held.val)], held.task.train.labels.numpy()
    assert set(labels_val) == set(labels_train) == set(range(len(mri.GROUPS)))
    # About val_fraction of the labelled images, from whole slabs; each class at least half
    # its share (50 per class: share round(7.5) = 8, half = 4).
    assert 0.08 <= len(val) / len(keep) <= 0.25
    assert np.bincount(labels_val, minlength=len(mri.GROUPS)).min() >= 4
    assert set(val[:, 2] // mri.SLAB_MM).isdisjoint(set(train[:, 2] // mri.SLAB_MM))


@needs_mri
def test_the_split_is_a_deterministic_function_of_the_seed(mri_plan):
    _, full, _ = mri_plan
    keep = capped(full.train.labels.numpy(), 30)
    task = indexed(full.train.labels[keep], full.train.spatial_group[keep])
    first, again = split_validation(task, 0.2, seed=3), split_validation(task, 0.2, seed=3)
    other = split_validation(task, 0.2, seed=4)
    assert np.array_equal(rows(first.val), rows(again.val))
    assert np.array_equal(rows(first.task.train), rows(again.task.train))
    assert not np.array_equal(rows(first.val), rows(other.val))


# ---------------------------------------------------------------- ct: footprints


@needs_ct
def test_ct_validation_patches_share_no_voxel_and_every_level_is_in_both_parts():
    volume = ct.read_ct_volume()
    full, plan = ct.build_ct_task(volume, seed=0, image_size=8)
    starts = plan["starts"]["train"]
    assert torch.equal(full.train.spatial_group, torch.from_numpy(starts[:, 0] // ct.SLAB_SLICES))
    keep = capped(full.train.labels.numpy(), 60, seed=1)
    task = indexed(full.train.labels[keep], full.train.spatial_group[keep])
    for seed in (0, 1):
        held = split_validation(task, 0.1, seed=seed)
        val, train = starts[keep][rows(held.val)], starts[keep][rows(held.task.train)]
        masks = []
        for part in (val, train):
            mask = np.zeros(volume.hu.shape, dtype=bool)
            for z, y0, x0 in part:
                mask[z, y0 : y0 + ct.PATCH_PX, x0 : x0 + ct.PATCH_PX] = True
            masks.append(mask)
        assert masks[0].any() and not (masks[0] & masks[1]).any()
        assert np.abs(val[:, 0][:, None] - train[:, 0][None, :]).min() >= ct.SLAB_SLICES + 1
        # The classes are z-ranges: each level still gives slabs of its own to validation.
        labels_val, labels_train = task.train.labels.numpy()[rows(held.val)], held.task.train.labels.numpy()
        assert set(labels_val) == set(labels_train) == set(range(len(ct.LEVELS)))


# ---------------------------------------------------------------- through load_task


@needs_mri
def test_withheld_label_images_in_validation_or_guard_slabs_leave_the_transfer_set(mri_plan):
    _, full, _ = mri_plan
    loaded = load_task({"name": "mri", "max_train": 210, "max_test": 14, "train_fraction": 0.5,
                        "image_size": 8, "seed": 0})
    # load_task carries each image's slab through caps, label withholding and resizing.
    slab_of_image = {img.numpy().tobytes(): int(g) for img, g in zip(full.train.images, full.train.spatial_group)}
    for images, groups in ((loaded.train.images, loaded.train.spatial_group),
                           (loaded.unlabelled, loaded.unlabelled_spatial_group)):
        assert groups is not None and len(groups) == len(images)
        assert [slab_of_image[img.numpy().tobytes()] for img in images] == groups.tolist()

    task, val = pipeline_split(loaded, 0.2, seed=0)
    held = {int(g) for g in val.spatial_group}
    blocked = held | {g + d for g in held for d in (-1, 1)}
    assert not blocked & set(task.unlabelled_spatial_group.tolist())
    assert not blocked & set(task.train.spatial_group.tolist())
    dropped = len(loaded.unlabelled) - len(task.unlabelled)
    assert dropped == int(np.isin(loaded.unlabelled_spatial_group.numpy(), list(blocked)).sum()) > 0
    assert task.provenance["validation_split"]["unlabelled_dropped"] == dropped
    assert "whole axial slabs" in task.provenance["split_rule"]


@needs_fashion
def test_fashion_mnist_falls_back_to_the_per_class_random_split():
    loaded = load_task({"name": "fashion-mnist", "max_train": 200, "max_test": 20, "image_size": 8})
    assert loaded.train.spatial_group is None
    logged = []
    task, val = pipeline_split(loaded, 0.2, seed=0, rule="auto", log=logged.append)
    keep, held_out = sampling.holdout_split(loaded.train.labels.numpy(), 0.2, 0)
    assert torch.equal(val.images, loaded.train.images[held_out])
    assert torch.equal(task.train.images, loaded.train.images[keep])
    assert logged == [f"validation: {len(held_out)} images, rule random"]
    assert task.provenance["validation_split"]["rule"] == "random"


@needs_mri
@needs_fashion
def test_multitask_splits_mri_by_slab_and_fashion_at_random():
    loaded = load_task({"name": "multitask", "tasks": ["mri", "fashion-mnist"], "max_train": 140,
                        "max_test": 20, "image_size": 8, "train_fraction": 0.5})
    groups, ids = loaded.train.spatial_group, loaded.train.task_ids
    assert (groups[ids == 0] >= 0).all() and (groups[ids == 1] == NO_SPATIAL_GROUP).all()
    assert loaded.unlabelled_spatial_group is not None
    assert torch.equal(loaded.unlabelled_spatial_group < 0, loaded.unlabelled_task_ids == 1)
    split = split_validation(loaded, 0.2, seed=0)
    assert split.rule == "spatial+random" and list(split.summary["slabs"]) == ["mri"]
    assert set(split.val.labels.tolist()) == set(split.task.train.labels.tolist()) == set(range(17))
    # Fashion-MNIST's withheld-label images have no slab and all stay.
    assert (split.task.unlabelled_task_ids == 1).sum() == (loaded.unlabelled_task_ids == 1).sum()
    # One task's view keeps its own slabs.
    view = split.task.task_view("mri")
    assert view.train.spatial_group is not None and view.unlabelled_spatial_group is not None
    assert split.task.task_view("fashion-mnist").train.spatial_group is None


# ---------------------------------------------------------------- the build


@needs_fashion
def test_spatial_on_fashion_mnist_stops_the_build_in_one_line(tmp_path, capsys):
    assert main(["data=fashion-mnist", "data.max_train=50", "data.max_test=10", "train.val_fraction=0.2",
                 "train.val_split=spatial", "recipe=scratch", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.val_split=spatial" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@needs_mri
def test_a_tiny_build_validates_on_held_out_slabs(tmp_path, one_torch_thread):
    report = run(load_config([
        "recipe=scratch", "target=cpu", "data.max_train=140", "data.max_test=28", "data.image_size=16",
        "train.epochs=1", "train.batch_size=32", "train.val_fraction=0.2", "export.precision=fp32",
        "export.calibration.images=16", "export.latency_runs=1", "export.latency_warmup=0",
        "export.latency_batches=[1]", "export.latency_threads=[1]", "progress=false",
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
    ]))
    split = report["data"]["provenance"]["validation_split"]
    assert split["rule"] == "spatial" and report["data"]["validation"] == split["validation"] > 0
    assert report["data"]["train"] == 140 - split["validation"] - split["guard_dropped"]
    assert "val_accuracy" in report["training"]["history"][0]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"validation: {split['validation']} images, rule spatial" in log
    assert "whole axial slabs" in (tmp_path / "run" / "report.md").read_text()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["data"]["validation"] == split["validation"]
