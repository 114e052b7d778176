"""data=multitask: tasks laid end to end with task ids, global labels in per-task ranges, each
task loaded (and validated) exactly as its own data set, one input shape, npz tasks by path,
clashes and bad keys refused in one line; single-task data keeps task_ids None."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medkd.recipes.base import UNLABELLED
from medkd.toolchain.config import load_config
from medkd.toolchain.data import ct, fashion_mnist, load_task
from medkd.toolchain.data.base import ImageSet
from medkd.toolchain.data.mri_volume import DEFAULT_DIR as MRI_DIR
from medkd.toolchain.data.multitask import DEFAULTS
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.export_stage import training_pool

from test_data import raises_user_error

needs_builtins = pytest.mark.skipif(
    not ((MRI_DIR / "ch2.nii.gz").is_file() and ct.DEFAULT_PATH.is_file()
         and (fashion_mnist.DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file()),
    reason="needs the Debian data packages mricron-data, invesalius-examples, dataset-fashion-mnist",
)
SIZE, MAX_TRAIN, MAX_TEST = 16, 70, 28


def write_npz(path: Path, n_classes: int, size: int, rgb: bool, seed: int, n=6, **extra) -> Path:
    """n images per class and split; class c is brighter with c (so classes differ)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)

    def split():
        labels = np.repeat(np.arange(n_classes), n)
        images = (rng.random((len(labels), *shape)) * 100 + labels.reshape(-1, *[1] * len(shape)) * 40)
        return images.astype(np.uint8), labels[:, None]

    (train_images, train_labels), (test_images, test_labels) = split(), split()
    np.savez(path, train_images=train_images, train_labels=train_labels, test_images=test_images,
             test_labels=test_labels, **extra)
    return path


refused = raises_user_error


@pytest.fixture(scope="module")
def rgb_npz(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("npz") / "pathmnist.npz", 3, 12, rgb=True, seed=1)


@pytest.fixture(scope="module")
def mixed(rgb_npz):
    """The three built-in tasks plus one RGB npz task, small caps."""
    return load_task({"name": "multitask", "tasks": ["mri", "ct", "fashion-mnist"], "npz_paths": [str(rgb_npz)],
                      "image_size": SIZE, "max_train": MAX_TRAIN, "max_test": MAX_TEST})


# ---------------------------------------------------------------- the merged data


@needs_builtins
def test_tasks_are_laid_end_to_end_with_their_own_classes(mixed):
    assert [t.name for t in mixed.tasks] == ["mri", "ct", "fashion-mnist", "pathmnist"]
    assert [t.num_classes for t in mixed.tasks] == [7, 4, 10, 3]
    assert [t.offset for t in mixed.tasks] == [0, 7, 11, 21]
    assert mixed.num_classes == 24 and mixed.is_multitask
    assert mixed.class_names[7] == "ct:skull-base" and mixed.class_names[-1] == "pathmnist:class_2"
    assert mixed.tasks[1].class_names == tuple(ct.LEVELS)


@needs_builtins
def test_every_image_carries_its_task_id_and_a_label_in_its_task_range(mixed):
    for images, cap in ((mixed.train, MAX_TRAIN), (mixed.test, MAX_TEST)):
        counts = torch.bincount(images.task_ids, minlength=4).tolist()
        assert counts == [cap, cap, cap, 18]  # the npz file has 3 x 6 images per split
        for t, info in enumerate(mixed.tasks):
            labels = images.labels[images.task_ids == t]
            assert info.offset <= labels.min() and labels.max() < info.offset + info.num_classes
            local = mixed.local_labels(images)[images.task_ids == t]
            assert torch.equal(local, labels - info.offset) and local.min() == 0
    # A shuffled batch mixes tasks and keeps ids, labels and images aligned.
    batch = mixed.train.subset(torch.randperm(len(mixed.train), generator=torch.Generator().manual_seed(0))[:64])
    assert len(batch.task_ids.unique()) == 4
    offsets = torch.tensor([t.offset for t in mixed.tasks])
    sizes = torch.tensor([t.num_classes for t in mixed.tasks])
    assert ((batch.labels >= offsets[batch.task_ids]) & (batch.labels < (offsets + sizes)[batch.task_ids])).all()


@needs_builtins
def test_one_input_shape_gray_tasks_replicated(mixed):
    assert mixed.train.images.shape[1:] == (3, SIZE, SIZE) and mixed.test.images.shape[1:] == (3, SIZE, SIZE)
    for t in range(3):  # mri, ct, fashion-mnist are gray: three identical channels
        images = mixed.train.images[mixed.train.task_ids == t]
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    rgb = mixed.train.images[mixed.train.task_ids == 3]
    assert not torch.equal(rgb[:, 0], rgb[:, 1])  # colour kept
    assert "replicated to 3 channels" in mixed.provenance["input_rule"]


@needs_builtins
def test_each_task_is_its_own_data_set(mixed, rgb_npz):
    """task_view(name) is exactly what data=<name> loads: same split, same checks, same caps."""
    caps = {"image_size": SIZE, "max_train": MAX_TRAIN, "max_test": MAX_TEST}
    alone = load_task({"name": "ct", **caps})
    view = mixed.task_view("ct")
    assert view.class_names == alone.class_names
    for split in ("train", "test"):
        assert torch.equal(getattr(view, split).images[:, :1], getattr(alone, split).images)
        assert torch.equal(getattr(view, split).labels, getattr(alone, split).labels)
    assert view.provenance["split_rule"] == alone.provenance["split_rule"]
    npz_alone = load_task({"name": "npz", "path": str(rgb_npz), **caps})
    assert torch.equal(mixed.task_view("pathmnist").test.images, npz_alone.test.images)
    # Each task's provenance (split rule, per-class counts, intensity baseline) is kept.
    for name in ("mri", "ct", "fashion-mnist", "pathmnist"):
        assert mixed.provenance["tasks"][name]["intensity_baseline"]["evaluated_on"] == "test"
        assert mixed.provenance["intensity_baseline"][name] == mixed.provenance["tasks"][name]["intensity_baseline"]
    assert "zero shared voxels" in mixed.provenance["tasks"]["ct"]["split_rule"]
    assert "hemisphere" in mixed.provenance["tasks"]["mri"]["split_rule"]
    with pytest.raises(KeyError, match="tasks: mri, ct"):
        mixed.task_view("chest")


def test_defaults_compose_from_the_config_group():
    cfg = load_config(["data=multitask", "data.npz_paths=[/x/a.npz]", "data.tasks=[mri,ct]"])
    assert set(cfg.data) == set(DEFAULTS)
    assert list(cfg.data.tasks) == ["mri", "ct"] and list(cfg.data.npz_paths) == ["/x/a.npz"]
    default = load_config(["data=multitask"]).data
    assert list(default.tasks) == ["mri", "ct", "fashion-mnist"]
    assert (default.image_size, default.max_train, default.max_test) == (32, 800, 200)


# ---------------------------------------------------------------- npz tasks, small and fast


def test_npz_tasks_image_size_null_takes_the_largest_and_keeps_withheld_task_ids(tmp_path):
    small = write_npz(tmp_path / "small.npz", 2, 8, rgb=False, seed=2)
    large = write_npz(tmp_path / "large.npz", 3, 12, rgb=False, seed=3)
    task = load_task({"name": "multitask", "tasks": [], "npz_paths": [str(small), str(large)],
                      "image_size": None, "max_train": None, "max_test": None, "train_fraction": 0.5})
    assert task.train.images.shape[1:] == (1, 12, 12) and task.provenance["image_size"] == 12
    assert task.unlabelled is not None and len(task.unlabelled) == len(task.unlabelled_task_ids) == 15
    assert torch.bincount(task.unlabelled_task_ids).tolist() == [6, 9]
    pool = training_pool(task)  # what kd/rd train on: labelled + withheld, task ids kept
    assert torch.equal(pool.task_ids, torch.cat([task.train.task_ids, task.unlabelled_task_ids]))
    assert (pool.labels[len(task.train):] == UNLABELLED).all()
    assert torch.equal(task.local_labels(pool)[len(task.train):], pool.labels[len(task.train):])
    assert len(task.task_view("large").unlabelled) == 9


def test_intensity_per_task_mapping(tmp_path):
    a = tmp_path / "a.npz"
    np.savez(a, train_images=np.array([[[0, 2000]], [[1000, 1000]]], dtype=np.uint16).repeat(8, 1).repeat(4, 2),
             train_labels=np.array([0, 1]), test_images=np.full((2, 8, 8), 500, dtype=np.uint16),
             test_labels=np.array([0, 1]))
    b = write_npz(tmp_path / "b.npz", 2, 8, rgb=False, seed=4)
    task = load_task({"name": "multitask", "tasks": [], "npz_paths": [str(a), str(b)], "image_size": 8,
                      "intensity": {"a": "window:1000,1000"}})
    assert task.provenance["tasks"]["a"]["intensity"] == {"rule": "window:1000,1000", "low": 500.0, "high": 1500.0}
    assert task.provenance["tasks"]["b"]["intensity"] == "uint8 / 255"


def test_single_task_data_is_unchanged(tmp_path):
    task = load_task({"name": "npz", "path": str(write_npz(tmp_path / "p.npz", 2, 8, rgb=False, seed=5))})
    assert task.train.task_ids is None and task.tasks is None and not task.is_multitask
    assert task.task_view("npz") is task and task.local_labels(task.train) is task.train.labels
    with pytest.raises(KeyError, match="single task"):
        task.task_view("ct")
    assert task.train.subset(torch.tensor([0, 1])).task_ids is None
    with pytest.raises(ValueError, match="task_ids"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- clashes and bad keys


def test_a_task_name_used_twice_is_refused(tmp_path):
    named_ct = write_npz(tmp_path / "ct.npz", 2, 8, rgb=False, seed=6)
    refused({"name": "multitask", "tasks": ["mri", "ct"], "npz_paths": [str(named_ct)]},
            "task name 'ct' is used twice", "ct.npz", "rename")
    (tmp_path / "other").mkdir()
    again = write_npz(tmp_path / "other" / "ct.npz", 2, 8, rgb=False, seed=7)
    refused({"name": "multitask", "tasks": [], "npz_paths": [str(named_ct), str(again)]}, "'ct' is used twice")
    refused({"name": "multitask", "tasks": ["ct", "ct"]}, "'ct' is used twice")


def test_an_npz_with_the_classes_or_images_of_another_task_is_refused(tmp_path):
    first = write_npz(tmp_path / "first.npz", 2, 8, rgb=False, seed=8, class_names=np.array(["benign", "malignant"]))
    same_classes = write_npz(tmp_path / "second.npz", 2, 8, rgb=False, seed=9,
                             class_names=np.array(["benign", "malignant"]))
    refused({"name": "multitask", "tasks": [], "npz_paths": [str(first), str(same_classes)]},
            "second.npz", "same classes as task 'first'")
    copy = tmp_path / "copy.npz"
    copy.write_bytes(first.read_bytes())
    refused({"name": "multitask", "tasks": [], "npz_paths": [str(first), str(copy)]},
            "copy.npz", "same training images as task 'first'")
    # Unnamed classes (class_0, class_1 in both) are no clash: different files, different tasks.
    other = write_npz(tmp_path / "other.npz", 2, 8, rgb=False, seed=10)
    plain = write_npz(tmp_path / "plain.npz", 2, 8, rgb=False, seed=11)
    assert load_task({"name": "multitask", "tasks": [], "npz_paths": [str(other), str(plain)]}).num_classes == 4


def test_validation_runs_per_task_and_names_it(tmp_path):
    good = write_npz(tmp_path / "good.npz", 2, 8, rgb=False, seed=12)
    one_class = write_npz(tmp_path / "lonely.npz", 1, 8, rgb=False, seed=13)
    refused({"name": "multitask", "tasks": [], "npz_paths": [str(good), str(one_class)]},
            "task 'lonely'", "at least two classes")
    refused({"name": "multitask", "tasks": [], "npz_paths": [str(good), str(tmp_path / "gone.npz")]},
            "task 'gone'", "not found")


@pytest.mark.parametrize("cfg, fragments", [
    ({"tasks": ["mri", "imagenet"]}, ["unknown task(s) imagenet", "mri, ct, fashion-mnist"]),
    ({"tasks": ["mri"]}, ["at least two tasks", "data=mri"]),
    ({"tasks": "mri,ct"}, ["data.tasks must be a list"]),
    ({"npz_paths": [3]}, ["data.npz_paths must be a list"]),
    ({"path": "/x"}, ["unknown data key", "path", "npz_paths"]),
    ({"intensity": "window:40,400"}, ["mapping task -> rule"]),
    ({"intensity": {"chest": "range"}}, ["unknown task(s) chest"]),
    ({"image_size": 4}, ["data.image_size"]),
])
def test_bad_multitask_keys_are_config_errors(cfg, fragments):
    refused({"name": "multitask", **cfg}, *fragments, error=ConfigError)
