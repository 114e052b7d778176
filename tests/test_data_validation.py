"""Labels and images are validated for every data source, and one intensity rule maps images
that are not 8-bit to [0, 1]: hand-computed values on small synthetic files in tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medkd.recipes.base import UNLABELLED
from medkd.toolchain.config import load_config
from medkd.toolchain.data import available_datasets, load_task, registry
from medkd.toolchain.data.base import ImageSet, TaskData
from medkd.toolchain.data.config import parse_data_config
from medkd.toolchain.data.intensity import IntensityRule, finite_range, parse_intensity, scale_to_unit
from medkd.toolchain.data.mri_volume import DEFAULT_DIR as MRI_DIR
from medkd.toolchain.data.mri_volume import normalise_intensity
from medkd.toolchain.data.validate import validate_task
from medkd.toolchain.errors import ConfigError, UserError


def refused(cfg, *fragments: str, error=UserError) -> str:
    """load_task(cfg) fails with a one-line `error` that mentions every fragment."""
    with pytest.raises(error) as info:
        load_task(cfg)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def flat_images(values, size=8, dtype=np.uint16) -> np.ndarray:
    """One size x size image per value, every pixel equal to it."""
    return np.stack([np.full((size, size), v, dtype=dtype) for v in values])


def write_npz(path: Path, train_images, train_labels, test_images, test_labels, **extra) -> Path:
    np.savez(path, train_images=train_images, train_labels=np.asarray(train_labels)[:, None],
             test_images=test_images, test_labels=np.asarray(test_labels)[:, None], **extra)
    return path


def pixel(images: torch.Tensor) -> list[float]:
    """The value of each flat image (checked flat), rounded against float32 noise."""
    flat = images.flatten(1)
    assert torch.equal(flat.min(1).values, flat.max(1).values)
    return [round(v, 6) for v in flat[:, 0].tolist()]


# ---------------------------------------------------------------- the intensity rule


def test_window_clips_then_scales_hand_computed():
    rule = parse_intensity("window:1000,2000")  # [0, 2000]
    assert rule.bounds([]) == (0.0, 2000.0)
    out = scale_to_unit(np.array([0, 1000, 3000], dtype=np.uint16), *rule.bounds([]))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.5, 1.0]
    # CT lung window on signed Hounsfield units: [-1350, 150].
    lung = parse_intensity("window:-600,1500")
    hu = np.array([-2000, -1000, -600, 150, 2000], dtype=np.int16)
    assert scale_to_unit(hu, *lung.bounds([])) == pytest.approx([0.0, 350 / 1500, 0.5, 1.0, 1.0])
    assert str(lung) == "window:-600,1500"


def test_range_uses_the_reference_min_max_and_ignores_non_finite_values():
    rule = parse_intensity("range")
    low, high = rule.bounds([np.array([1000.0, np.nan]), np.array([[3000.0, -np.inf], [2000.0, 1500.0]])])
    assert (low, high) == (1000.0, 3000.0)
    out = scale_to_unit(np.array([1000, 2000, 3000, 4000, np.nan, np.inf, -np.inf]), low, high)
    assert out[:4].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert np.isnan(out[4]) and out[5] == np.inf and out[6] == -np.inf  # left for validate.py
    assert scale_to_unit(np.full(3, 7.0), 7.0, 7.0).tolist() == [0.0, 0.0, 0.0]  # flat data set
    assert finite_range([np.array([np.nan])]) == (0.0, 1.0)


@pytest.mark.parametrize("value, fragment", [
    ("window:abc", "two numbers"),
    ("window:40", "two numbers"),
    ("window:1,2,3", "two numbers"),
    ("window:nan,400", "two numbers"),
    ("window:40,0", "WIDTH must be > 0"),
    ("window:40,-5", "WIDTH must be > 0"),
    ("minmax", "unknown data.intensity"),
    ("windows:40,400", "unknown data.intensity"),
    (65535, "unknown data.intensity"),
])
def test_bad_intensity_values_are_one_line_config_errors(value, fragment):
    message = refused({"name": "npz", "path": "unused.npz", "intensity": value}, fragment,
                      "range", "window:LEVEL,WIDTH", error=ConfigError)
    assert str(value) in message


def test_window_composes_from_the_command_line_when_quoted():
    cfg = load_config(["data=npz", "data.path=x.npz", "data.intensity='window:40,400'"])
    rule = parse_data_config(cfg.data, available_datasets()).intensity
    assert rule == IntensityRule("window", 40.0, 400.0)
    default = parse_data_config(load_config(["data=npz", "data.path=x"]).data, available_datasets())
    assert default.intensity.kind == "range"
    with pytest.raises(ConfigError, match="quote a value holding commas"):  # Hydra reads a,b as a sweep
        load_config(["data=npz", "data.path=x.npz", "data.intensity=window:40,400"])


def test_mri_volume_uses_the_same_rule():
    volume = np.concatenate([np.zeros(10), np.arange(1, 202)]).astype(np.float32)  # air + head 1..201
    # Default: 0.5th / 99.5th percentile of the 201 head voxels = values 2 and 200.
    out, used = normalise_intensity(volume)
    assert (used["low"], used["high"]) == (2.0, 200.0)
    assert out[[0, 10, 110, 210]].tolist() == pytest.approx([0.0, 0.0, 99 / 198, 1.0])
    out, used = normalise_intensity(volume, parse_intensity("range"))  # 0..201
    assert used == {"rule": "range", "low": 0.0, "high": 201.0}
    assert out[110] == pytest.approx(101 / 201)
    out, _ = normalise_intensity(volume, parse_intensity("window:100,100"))  # [50, 150]
    assert out[[10, 109, 210]].tolist() == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.skipif(not (MRI_DIR / "ch2.nii.gz").is_file(),
                    reason="Debian package mricron-data not installed (no ch2.nii.gz)")
def test_mri_task_records_the_rule_it_used():
    base = {"name": "mri", "max_train": 14, "max_test": 7}
    default = load_task(base).provenance["intensity"]
    assert default["rule"].startswith("head percentiles") and default["high"] < 254
    ranged = load_task({**base, "intensity": "range"})
    assert ranged.provenance["intensity"] == {"rule": "range", "low": 0.0, "high": 254.0}
    assert ranged.image_size == 32  # image_size null keeps the 32 mm patches at 1 px per mm


# ---------------------------------------------------------------- npz: 16-bit, float, MedMNIST+


def test_uint16_npz_range_comes_from_the_training_split(tmp_path):
    path = write_npz(tmp_path / "ct.npz", flat_images([0, 1000, 2000, 3000]), [0, 1, 0, 1],
                     flat_images([500, 4000]), [0, 1])
    task = load_task({"name": "npz", "path": str(path)})
    assert pixel(task.train.images) == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)
    # Over both splits 4000 would be the max and 3000 would map to 0.75; train-only clips it.
    assert pixel(task.test.images) == pytest.approx([1 / 6, 1.0], abs=1e-6)
    assert task.provenance["intensity"] == {"rule": "range", "low": 0.0, "high": 3000.0}
    windowed = load_task({"name": "npz", "path": str(path), "intensity": "window:1000,2000"})
    assert pixel(windowed.train.images) == [0.0, 0.5, 1.0, 1.0]
    assert pixel(windowed.test.images) == [0.25, 1.0]


def test_float_and_signed_npz_use_the_rule_and_uint8_stays_divided_by_255(tmp_path):
    floats = write_npz(tmp_path / "f.npz", flat_images([-1.0, 3.0], dtype=np.float32), [0, 1],
                       flat_images([1.0], dtype=np.float32), [0])
    assert pixel(load_task({"name": "npz", "path": str(floats)}).test.images) == [0.5]
    hu = write_npz(tmp_path / "hu.npz", flat_images([-1000, 1000], dtype=np.int16), [0, 1],
                   flat_images([0], dtype=np.int16), [1])
    windowed = load_task({"name": "npz", "path": str(hu), "intensity": "window:0,1000"})
    assert pixel(windowed.train.images) == [0.0, 1.0]
    bytes_ = write_npz(tmp_path / "u8.npz", flat_images([0, 51], dtype=np.uint8), [0, 1],
                       flat_images([255], dtype=np.uint8), [1])
    task = load_task({"name": "npz", "path": str(bytes_), "intensity": "window:0,10"})
    assert pixel(task.train.images) == [0.0, 0.2] and task.provenance["intensity"] == "uint8 / 255"


def test_mixed_pixel_types_across_splits_are_refused(tmp_path):
    path = write_npz(tmp_path / "m.npz", flat_images([0, 1]), [0, 1], flat_images([0], dtype=np.uint8), [0])
    refused({"name": "npz", "path": str(path)}, "uint16", "uint8", "one pixel type")


@pytest.mark.parametrize("size", [64, 128])
def test_medmnist_plus_npz_keeps_its_size_unless_image_size_says_otherwise(tmp_path, size):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path / f"pathmnist_{size}.npz",
                     rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8), [0, 1, 2] * 2,
                     rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8), [0, 1, 2])
    composed = load_config(["data=npz", f"data.path={path}"]).data  # the shipped npz.yaml
    task = load_task(composed)
    assert task.train.images.shape == (6, 3, size, size) and task.provenance["image_size"] == size
    raw = torch.from_numpy(np.load(path)["train_images"])
    assert torch.equal(task.train.images, raw.permute(0, 3, 1, 2) / 255)
    smaller = load_task(load_config(["data=npz", f"data.path={path}", "data.image_size=32"]).data)
    assert smaller.train.images.shape == (6, 3, 32, 32) and smaller.image_size == 32


@pytest.mark.parametrize("shape, fragment", [((2, 16, 12), "not square"), ((2, 4, 4), "outside 8..1024")])
def test_native_size_that_cannot_be_kept_asks_for_image_size(tmp_path, shape, fragment):
    images = np.zeros(shape, dtype=np.uint8)
    path = write_npz(tmp_path / "odd.npz", images, [0, 1], images[:1], [0])
    refused({"name": "npz", "path": str(path)}, fragment, "data.image_size", error=ConfigError)
    assert load_task({"name": "npz", "path": str(path), "image_size": 8}).image_size == 8


# ---------------------------------------------------------------- folder: 16-bit PNG, float TIFF


def write_png16(path: Path, value: int, size=8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)


def test_16bit_png_through_the_folder_loader(tmp_path):
    write_png16(tmp_path / "train" / "a" / "0.png", 1000)
    write_png16(tmp_path / "train" / "b" / "0.png", 3000)
    write_png16(tmp_path / "test" / "a" / "0.png", 2000)
    write_png16(tmp_path / "test" / "b" / "0.png", 5000)
    Image.new("L", (8, 8), 51).save(tmp_path / "test" / "b" / "1.png")  # 8-bit: / 255
    with Image.open(tmp_path / "train" / "a" / "0.png") as image:
        assert image.mode.startswith("I")  # really read as a 16-bit image
    task = load_task({"name": "folder", "path": str(tmp_path), "image_size": None})
    assert task.image_size == 8  # null: the images' own size
    assert pixel(task.train.images) == [0.0, 1.0]  # range of the training 16-bit images: 1000..3000
    assert pixel(task.test.images) == [0.5, 1.0, 0.2]  # not 2000/65535 = 0.03
    assert task.provenance["intensity"] == {"rule": "range", "low": 1000.0, "high": 3000.0}
    windowed = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8,
                          "intensity": "window:3000,2000"})  # [2000, 4000]
    assert pixel(windowed.train.images) == [0.0, 0.5] and pixel(windowed.test.images) == [0.0, 1.0, 0.2]


def test_folder_native_size_needs_one_square_size(tmp_path):
    write_png16(tmp_path / "a" / "0.png", 1, size=8)
    write_png16(tmp_path / "a" / "1.png", 1, size=8)
    write_png16(tmp_path / "b" / "0.png", 1, size=12)
    write_png16(tmp_path / "b" / "1.png", 1, size=8)
    refused({"name": "folder", "path": str(tmp_path)}, "2 sizes", "8x8", "12x12", "data.image_size")


def test_nan_in_a_float_tiff_survives_resizing_and_is_named(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            image = np.full((10, 10), 0.5, dtype=np.float32)
            if (split, name) == ("test", "b"):
                image[3, 4] = np.inf
            path = tmp_path / split / name / "0.tif"
            path.parent.mkdir(parents=True)
            Image.fromarray(image, mode="F").save(path)
    refused({"name": "folder", "path": str(tmp_path), "image_size": 8}, "test split", "index 1")


# ---------------------------------------------------------------- labels


def test_sparse_labels_are_renumbered_keeping_the_original_ids(tmp_path):
    path = write_npz(tmp_path / "sparse.npz", flat_images([1, 2, 3, 4], dtype=np.uint8), [0, 100000, 0, 100000],
                     flat_images([5, 6], dtype=np.uint8), [100000, 0])
    task = load_task({"name": "npz", "path": str(path), "train_fraction": 0.5})
    assert task.num_classes == 2  # not a 100001-output model
    assert task.class_names == ["class_0", "class_100000"]
    assert task.provenance["original_labels"] == [0, 100000]
    assert task.test.labels.tolist() == [1, 0]
    assert sorted(task.train.labels.tolist()) == [0, 1] and len(task.unlabelled) == 2  # scarce setting works
    assert task.provenance["train_per_class"] == [1, 1]


def test_gaps_in_named_classes_keep_the_names(tmp_path):
    names = np.array(["air", "fat", "bone", "lung", "liver"])
    path = write_npz(tmp_path / "named.npz", flat_images([1, 2, 3], dtype=np.uint8), [1, 4, 1],
                     flat_images([4], dtype=np.uint8), [4], class_names=names)
    task = load_task({"name": "npz", "path": str(path)})
    assert task.class_names == ["fat", "liver"] and task.train.labels.tolist() == [0, 1, 0]
    assert task.provenance["original_labels"] == [1, 4]


def test_contiguous_labels_are_left_alone(tmp_path):
    path = write_npz(tmp_path / "ok.npz", flat_images([1, 2, 3], dtype=np.uint8), [0, 1, 2],
                     flat_images([4], dtype=np.uint8), [2])
    task = load_task({"name": "npz", "path": str(path)})
    assert task.class_names == ["class_0", "class_1", "class_2"] and "original_labels" not in task.provenance
    assert task.train.labels.tolist() == [0, 1, 2]


def write_idx(path: Path, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def one_class_source(kind: str, tmp_path: Path) -> dict:
    """A data set of each file-backed source whose training split holds a single class."""
    if kind == "npz":
        path = write_npz(tmp_path / "one.npz", flat_images([1, 2, 3], dtype=np.uint8), [0, 0, 0],
                         flat_images([4], dtype=np.uint8), [0])
        return {"name": "npz", "path": str(path)}
    if kind == "folder":
        (tmp_path / "only").mkdir()
        for i in range(3):
            Image.new("L", (8, 8), i).save(tmp_path / "only" / f"{i}.png")
        return {"name": "folder", "path": str(tmp_path)}
    for prefix, n in (("train", 6), ("t10k", 2)):  # fashion-mnist: every label 3 (Dress)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.full(n, 3))
    return {"name": "fashion-mnist", "path": str(tmp_path)}


@pytest.mark.parametrize("kind, name", [("npz", "class_0"), ("folder", "only"), ("fashion-mnist", "Dress")])
def test_one_class_data_sets_are_refused_before_any_accuracy(tmp_path, kind, name):
    refused(one_class_source(kind, tmp_path), f"only class '{name}'", "at least two classes")


# multitask has no loader of its own: it loads each task through these (test_data_multitask.py).
@pytest.mark.parametrize("source", sorted(registry.LOADERS))
def test_every_registered_source_is_validated(monkeypatch, source):
    """Whatever a loader returns passes validate_task: here a one-class task from each."""
    one_class = TaskData(source, ImageSet(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64)),
                         ImageSet(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64)), ["x", "y"])
    monkeypatch.setitem(registry.LOADERS, source, lambda cfg: one_class)
    refused({"name": source, "path": "unused"}, source, "only class 'x'")


def test_one_class_build_exits_with_one_line_and_no_run_dir(tmp_path, capsys):
    from medkd.toolchain.cli import main

    cfg = one_class_source("npz", tmp_path)
    code = main(["recipe=scratch", "data=npz", f"data.path={cfg['path']}", f"run_dir={tmp_path / 'run'}",
                 "progress=false"])
    err = capsys.readouterr().err
    assert code == 1 and "at least two classes" in err and "100" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unseen_test_class_is_an_error_unless_allowed(tmp_path):
    names = np.array(["benign", "malignant", "artefact"])
    path = write_npz(tmp_path / "unseen.npz", flat_images([1, 2, 3, 4], dtype=np.uint8), [0, 1, 0, 1],
                     flat_images([5, 6, 7], dtype=np.uint8), [0, 2, 2], class_names=names)
    refused({"name": "npz", "path": str(path)}, "'artefact' (2 images)", "lacks",
            "data.allow_unseen_test_classes=true")
    task = load_task({"name": "npz", "path": str(path), "allow_unseen_test_classes": True})
    assert task.class_names == ["benign", "malignant", "artefact"] and task.test.labels.tolist() == [0, 2, 2]
    assert task.provenance["unseen_test_classes"] == ["artefact"]
    refused({"name": "npz", "path": str(path), "allow_unseen_test_classes": "yes"},
            "data.allow_unseen_test_classes must be true or false", error=ConfigError)


def test_unseen_test_folder_is_allowed_by_the_override(tmp_path):
    for split, names in (("train", ["a", "b"]), ("test", ["a", "b", "zebra"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (8, 8), 9).save(tmp_path / split / name / "0.png")
    refused({"name": "folder", "path": str(tmp_path), "image_size": 8}, "'zebra' (1 images)")
    task = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8,
                      "allow_unseen_test_classes": True})
    assert task.class_names == ["a", "b", "zebra"] and task.train.labels.tolist() == [0, 1]
    assert task.test.labels.tolist() == [0, 1, 2]


def test_withheld_labels_are_no_class_and_survive_renumbering():
    train = ImageSet(torch.zeros(5, 1, 8, 8), torch.tensor([7, UNLABELLED, 3, UNLABELLED, 7]))
    test = ImageSet(torch.zeros(2, 1, 8, 8), torch.tensor([3, 7]))
    task = validate_task(TaskData("t", train, test, []))
    assert task.class_names == ["class_3", "class_7"]
    assert task.train.labels.tolist() == [1, UNLABELLED, 0, UNLABELLED, 1]
    only_withheld = ImageSet(torch.zeros(3, 1, 8, 8), torch.tensor([0, UNLABELLED, UNLABELLED]))
    with pytest.raises(UserError, match="only class 'class_0'"):
        validate_task(TaskData("t", only_withheld, test, []))
    with pytest.raises(UserError, match="test image.* have no label"):
        validate_task(TaskData("t", train, ImageSet(test.images, torch.tensor([3, UNLABELLED])), []))


# ---------------------------------------------------------------- NaN / Inf images


def test_nan_and_inf_images_are_named_by_split_count_and_first_index(tmp_path):
    train = flat_images([0.1, 0.2, 0.3, np.nan, 0.5, np.nan], dtype=np.float32)
    train[4, 2, 2] = np.inf  # one pixel is enough
    test = flat_images([0.1, 0.2], dtype=np.float32)
    path = write_npz(tmp_path / "nan.npz", train, [0, 1] * 3, test, [0, 1])
    refused({"name": "npz", "path": str(path)}, "the train split",
            "2 image(s) with NaN values (first: index 3)",
            "1 image(s) with infinite values (first: index 4)")
    test[1, 0, 0] = -np.inf
    path = write_npz(tmp_path / "inf.npz", train[:3], [0, 1, 0], test, [0, 1])
    refused({"name": "npz", "path": str(path)}, "the test split",
            "1 image(s) with infinite values (first: index 1)")
