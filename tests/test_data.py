"""The data layer: config checks, stratified sampling, and each loader (npz, folder,
fashion-mnist, mri) including its error messages and the MRI task's spatial disjointness."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from medkd.toolchain.data import available_datasets, load_mri_volume, load_task
from medkd.toolchain.data import fashion_mnist, mri, sampling
from medkd.toolchain.data.config import parse_data_config
from medkd.toolchain.data.mri_volume import DEFAULT_DIR as MRI_DIR
from medkd.toolchain.data.mri_volume import read_mri_volume
from medkd.toolchain.errors import UserError

MRI_FILES = [MRI_DIR / f for f in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")]
needs_mri = pytest.mark.skipif(
    not all(f.is_file() for f in MRI_FILES),
    reason="Debian package mricron-data not installed (no /usr/share/mricron/templates/ch2.nii.gz)",
)
needs_fashion = pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (no /usr/share/datasets/fashion-mnist)",
)


def counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def raises_user_error(cfg, *fragments: str, error=UserError) -> str:
    """load_task(cfg) must fail with a one-line `error` that mentions every fragment."""
    with pytest.raises(error) as info:
        load_task(cfg)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- config and registry


def test_registry_lists_the_datasets():
    assert available_datasets() == ["ct", "fashion-mnist", "folder", "mri", "mri-regions", "mri-seg", "multitask", "npz",
                                    "seg-folder", "seg-npz"]


@pytest.mark.parametrize(
    "cfg, fragments",
    [
        ({"name": "imagenet"}, ["imagenet", "mri", "fashion-mnist", "npz", "folder"]),
        ({"image_size": 4}, ["data.image_size", "from 8"]),
        ({"image_size": "32"}, ["data.image_size"]),
        ({"image_size": True}, ["data.image_size"]),
        ({"train_fraction": 0.0}, ["data.train_fraction", "(0, 1]"]),
        ({"train_fraction": 1.5}, ["data.train_fraction"]),
        ({"train_fraction": "half"}, ["data.train_fraction"]),
        ({"max_train": 0}, ["data.max_train", "positive"]),
        ({"max_test": -3}, ["data.max_test"]),
        ({"max_test": 2.5}, ["data.max_test"]),
        ({"seed": -1}, ["data.seed"]),
        ({"max_trian": 5}, ["unknown data key", "max_trian", "max_train"]),
        ({"name": "npz"}, ["data.path is required", "npz"]),
        ({"name": "folder", "path": "???"}, ["data.path is required", "folder"]),
        ({"name": "npz", "path": ""}, ["data.path"]),
    ],
)
def test_bad_config_values_are_user_errors(cfg, fragments):
    raises_user_error(cfg, *fragments)


# ---------------------------------------------------------------- sampling


def test_stratified_cap_keeps_class_proportions_and_is_seeded():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    index = sampling.stratified_cap(labels, 50, seed=0, purpose="max_train")
    assert np.bincount(labels[index]).tolist() == [30, 15, 5]
    assert np.array_equal(index, sampling.stratified_cap(labels, 50, seed=0, purpose="max_train"))
    assert not np.array_equal(index, sampling.stratified_cap(labels, 50, seed=1, purpose="max_train"))
    smaller = sampling.stratified_cap(labels, 20, seed=0, purpose="max_train")
    assert set(smaller) <= set(index)  # nested: a smaller cap keeps a subset
    # Rare classes keep one example even when their share rounds to zero.
    tiny = sampling.stratified_cap(np.repeat([0, 1, 2], [98, 1, 1]), 3, seed=0, purpose="max_train")
    assert np.bincount(np.repeat([0, 1, 2], [98, 1, 1])[tiny]).tolist() == [1, 1, 1]


def test_stratified_cap_below_class_count_is_user_error():
    with pytest.raises(UserError, match="smaller than the number of classes"):
        sampling.stratified_cap(np.arange(5), 3, seed=0, purpose="max_train")


def test_stratified_fraction_keeps_at_least_one_per_class_and_nests():
    labels = np.repeat([0, 1, 2, 3], [60, 30, 10, 3])
    tenth = sampling.stratified_fraction(labels, 0.1, seed=3)
    assert np.bincount(labels[tenth]).tolist() == [6, 3, 1, 1]
    half = sampling.stratified_fraction(labels, 0.5, seed=3)
    assert np.bincount(labels[half]).tolist() == [30, 15, 5, 2]
    assert set(tenth) <= set(half)


def test_holdout_split_is_disjoint_and_puts_every_class_in_both():
    labels = np.repeat([0, 1, 2], [10, 5, 2])
    train, test = sampling.holdout_split(labels, 0.2, seed=0)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [2, 1, 1]


# ---------------------------------------------------------------- npz


def write_npz(path: Path, drop=(), **arrays) -> Path:
    rng = np.random.default_rng(0)
    content = {
        "train_images": rng.integers(0, 256, (40, 12, 12), dtype=np.uint8),
        "train_labels": np.repeat(np.arange(4), 10)[:, None].astype(np.uint8),
        "val_images": rng.integers(0, 256, (7, 12, 12), dtype=np.uint8),
        "val_labels": np.zeros((7, 1), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (20, 12, 12), dtype=np.uint8),
        "test_labels": np.repeat(np.arange(4), 5)[:, None].astype(np.uint8),
    }
    content.update(arrays)
    for key in drop:
        del content[key]
    np.savez(path, **content)
    return path


def test_npz_gray_keeps_pixels_labels_and_ignores_val(tmp_path):
    path = write_npz(tmp_path / "x.npz", class_names=np.array(["a", "b", "c", "d"]))
    task = load_task(OmegaConf.create({"name": "npz", "path": str(path), "image_size": 12}))
    raw = np.load(path)
    assert task.train.images.shape == (40, 1, 12, 12) and task.train.images.dtype == torch.float32
    assert torch.equal(task.train.images[:, 0], torch.from_numpy(raw["train_images"]).float() / 255)
    assert torch.equal(task.test.labels, torch.from_numpy(raw["test_labels"][:, 0].astype(np.int64)))
    assert task.class_names == ["a", "b", "c", "d"]
    assert len(task.train) == 40  # the 7 val images are not folded in


def test_npz_rgb_resized_with_default_class_names(tmp_path):
    rgb = np.zeros((40, 12, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: channel order must survive
    path = write_npz(tmp_path / "rgb.npz", train_images=rgb, test_images=rgb[:20])
    task = load_task({"name": "npz", "path": str(path), "image_size": 20})
    assert task.train.images.shape == (40, 3, 20, 20) and task.in_chans == 3
    assert torch.allclose(task.train.images[:, 0], torch.ones(1)) and task.train.images[:, 1:].max() == 0
    assert task.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_caps_and_fraction_are_stratified_through_load_task(tmp_path):
    path = write_npz(tmp_path / "x.npz")
    task = load_task({"name": "npz", "path": str(path), "max_train": 20, "max_test": 8,
                      "train_fraction": 0.5, "seed": 1})
    assert counts(task.train.labels, 4) == [3, 3, 3, 3]  # 20 -> 5 per class, then half (2.5 -> 3)
    assert counts(task.test.labels, 4) == [2, 2, 2, 2]
    assert task.provenance["train_per_class"] == [3, 3, 3, 3]


def _npz_cases(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    npy = tmp_path / "plain.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    return {
        "missing file": (tmp_path / "nope.npz", ["not found", "nope.npz"]),
        "directory": (tmp_path, ["is a directory"]),
        "not a zip": (text, ["not an .npz"]),
        "npy not npz": (npy, ["not an .npz"]),
        "missing keys": (write_npz(tmp_path / "k.npz", drop=("test_images", "test_labels")),
                         ["test_images", "test_labels", "lacks"]),
        "count mismatch": (write_npz(tmp_path / "n.npz", train_labels=np.zeros((39, 1), np.uint8)),
                           ["40 images", "39 labels"]),
        "wrong ndim": (write_npz(tmp_path / "d.npz", train_images=np.zeros((40, 144), np.uint8)),
                       ["train_images", "shape (40, 144)"]),
        "3d volumes": (write_npz(tmp_path / "v.npz", train_images=np.zeros((40, 8, 8, 8), np.uint8)),
                       ["3D", "not supported"]),
        "multi-label": (write_npz(tmp_path / "m.npz", train_labels=np.zeros((40, 14), np.uint8)),
                        ["multi-label", "unsupported"]),
        "float labels": (write_npz(tmp_path / "f.npz", train_labels=np.zeros(40, np.float32)),
                         ["integer class indices"]),
        "negative label": (write_npz(tmp_path / "g.npz", test_labels=-np.ones(20, np.int64)),
                           ["negative"]),
        "size mismatch": (write_npz(tmp_path / "s.npz", test_images=np.zeros((20, 10, 10), np.uint8)),
                          ["same image size"]),
        "short class_names": (write_npz(tmp_path / "c.npz", class_names=np.array(["a", "b"])),
                              ["class_names has 2 names"]),
    }


@pytest.mark.parametrize("case", [
    "missing file", "directory", "not a zip", "npy not npz", "missing keys", "count mismatch",
    "wrong ndim", "3d volumes", "multi-label", "float labels", "negative label", "size mismatch",
    "short class_names",
])
def test_npz_problems_are_user_errors(tmp_path, case):
    path, fragments = _npz_cases(tmp_path)[case]
    raises_user_error({"name": "npz", "path": str(path)}, *fragments)


# ---------------------------------------------------------------- folder


def write_image(path: Path, value: int, mode: str = "L", size=(10, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 0, 0)
    Image.new(mode, size, colour).save(path)


def test_folder_train_test_layout_gray(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate(["dog", "cat"]):
            for i in range(n):
                write_image(tmp_path / split / name / f"{i}.png", 10 * c + i)
    (tmp_path / "train" / "cat" / "README.txt").write_text("ignored: not an image")
    task = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8})
    assert task.class_names == ["cat", "dog"]  # sorted folder names
    assert task.train.images.shape == (6, 1, 8, 8) and task.test.images.shape == (2, 1, 8, 8)
    assert counts(task.train.labels, 2) == [3, 3]
    # cat/0.png was written with value 10 -> 10/255 everywhere after resizing a flat image.
    assert torch.allclose(task.test.images[0], torch.full((1, 8, 8), 10 / 255))


def test_folder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", 200, mode="RGB")
    write_image(tmp_path / "train" / "b" / "0.png", 50)
    write_image(tmp_path / "test" / "b" / "0.jpg", 50)
    task = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8})
    assert task.in_chans == 3
    red = task.train.images[task.train.labels == 0][0]
    assert red[0].mean() > 0.7 and red[1:].max() < 0.01
    gray = task.train.images[task.train.labels == 1][0]
    assert torch.allclose(gray[0], gray[2])  # gray replicated to all channels


def test_folder_flat_layout_splits_80_20_per_class_by_seed(tmp_path):
    for c, name in enumerate(["x", "y"]):
        for i in range(10):
            write_image(tmp_path / name / f"{i}.png", 20 * c + i + 1)

    def pixel_values(images):
        return {round(v * 255) for v in images[:, 0, 0, 0].tolist()}

    task = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8, "seed": 0})
    assert counts(task.train.labels, 2) == [8, 8] and counts(task.test.labels, 2) == [2, 2]
    train_values, test_values = pixel_values(task.train.images), pixel_values(task.test.images)
    assert train_values.isdisjoint(test_values) and len(train_values | test_values) == 20
    again = load_task({"name": "folder", "path": str(tmp_path), "image_size": 8, "seed": 0})
    assert pixel_values(again.test.images) == test_values
    other_seeds = [pixel_values(load_task({"name": "folder", "path": str(tmp_path), "image_size": 8,
                                           "seed": s}).test.images) for s in (1, 2)]
    assert any(values != test_values for values in other_seeds)


def _folder_cases(tmp_path):
    cases = {}
    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()
    cases["no class dirs"] = (empty_root, ["no class folders"])
    empty_class = tmp_path / "empty_class"
    write_image(empty_class / "a" / "0.png", 1)
    write_image(empty_class / "a" / "1.png", 1)
    (empty_class / "b").mkdir()
    cases["empty class"] = (empty_class, ["has no images", "b"])
    broken = tmp_path / "broken"
    write_image(broken / "a" / "0.png", 1)
    write_image(broken / "a" / "1.png", 1)
    (broken / "a" / "corrupt.png").write_bytes(b"\x89PNG but not really")
    cases["unreadable image"] = (broken, ["cannot read image", "corrupt.png"])
    extra = tmp_path / "extra_test_class"
    write_image(extra / "train" / "a" / "0.png", 1)
    write_image(extra / "train" / "b" / "0.png", 1)  # two training classes: see test_data_validation
    write_image(extra / "test" / "a" / "0.png", 1)
    write_image(extra / "test" / "zebra" / "0.png", 1)
    cases["test class not in train"] = (extra, ["zebra", "lacks"])
    only_train = tmp_path / "only_train"
    write_image(only_train / "train" / "a" / "0.png", 1)
    cases["train without test"] = (only_train, ["no test/ folder"])
    single = tmp_path / "single"
    write_image(single / "a" / "0.png", 1)
    write_image(single / "b" / "0.png", 1)
    write_image(single / "b" / "1.png", 1)
    cases["one image class"] = (single, ["only 1 image"])
    cases["missing root"] = (tmp_path / "nowhere", ["not found"])
    return cases


@pytest.mark.parametrize("case", [
    "no class dirs", "empty class", "unreadable image", "test class not in train",
    "train without test", "one image class", "missing root",
])
def test_folder_problems_are_user_errors(tmp_path, case):
    path, fragments = _folder_cases(tmp_path)[case]
    # image_size given: the 10 x 14 images have no square native size.
    raises_user_error({"name": "folder", "path": str(path), "image_size": 8}, *fragments)


# ---------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion(directory: Path, n_train=30, n_test=10) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_idx_parser_on_small_files(tmp_path):
    write_fake_fashion(tmp_path)
    task = load_task({"name": "fashion-mnist", "path": str(tmp_path), "image_size": 28})
    assert task.train.images.shape == (30, 1, 28, 28) and len(task.test) == 10
    assert counts(task.train.labels, 10) == [3] * 10
    assert task.class_names[0] == "T-shirt/top" and task.class_names[9] == "Ankle boot"


def test_fashion_missing_files_say_how_to_install(tmp_path):
    raises_user_error({"name": "fashion-mnist", "path": str(tmp_path)},
                      "apt-get install dataset-fashion-mnist", "data.path")


@pytest.mark.parametrize("problem", ["magic", "truncated", "count mismatch"])
def test_fashion_corrupt_idx_is_user_error(tmp_path, problem):
    write_fake_fashion(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    if problem == "magic":
        write_idx(labels, np.zeros(30), magic=0x0803)
        fragments = ["magic"]
    elif problem == "truncated":
        with gzip.open(labels, "wb") as f:
            f.write(struct.pack(">II", 0x0801, 30) + bytes(12))
        fragments = ["needs"]
    else:
        write_idx(labels, np.zeros(29))
        fragments = ["30 images", "29 labels"]
    raises_user_error({"name": "fashion-mnist", "path": str(tmp_path)}, *fragments)


@needs_fashion
def test_fashion_mnist_real_debian_files():
    full = fashion_mnist.load_fashion_mnist(parse_data_config({"name": "fashion-mnist"}, available_datasets()))
    assert len(full.train) == 60000 and len(full.test) == 10000
    assert counts(full.train.labels, 10) == [6000] * 10 and counts(full.test.labels, 10) == [1000] * 10
    task = load_task({"name": "fashion-mnist", "image_size": 32, "max_train": 1000, "max_test": 500})
    assert task.train.images.shape == (1000, 1, 32, 32)
    assert counts(task.train.labels, 10) == [100] * 10 and counts(task.test.labels, 10) == [50] * 10
    assert 0.0 <= task.train.images.min() and task.train.images.max() <= 1.0


# ---------------------------------------------------------------- mri


@pytest.fixture(scope="module")
def volume():
    return read_mri_volume()


@needs_mri
def test_mri_volume_orientation_and_region_names(volume):
    t1, labels, names = load_mri_volume()
    assert t1.shape == labels.shape == (181, 217, 181) and t1.dtype == np.float32
    assert 0.0 <= t1.min() and t1.max() == 1.0
    assert len(names) == 116 and names[1] == "Precentral_L" and names[116] == "Vermis_10"
    # Atlas names agree with the grid: every *_L region's centroid is left of x = 0 mm.
    x_mm = np.arange(labels.shape[0]) * volume.affine[0, 0] + volume.affine[0, 3]
    voxels = np.bincount(labels.ravel(), minlength=117)
    mean_x = np.bincount(labels.ravel(), weights=np.broadcast_to(x_mm[:, None, None], labels.shape).ravel(),
                         minlength=117) / np.maximum(voxels, 1)
    for label, region in names.items():
        assert voxels[label] > 0, region
        if region.endswith("_L"):
            assert mean_x[label] < 0, region
        if region.endswith("_R"):
            assert mean_x[label] > 0, region
    # The T1 lines up with the atlas: grey matter is brighter than the air outside the head.
    assert t1[labels > 0].mean() > 0.3 > t1[0:5, 0:5, :].mean()


@needs_mri
def test_aal_groups_follow_the_aal_lobe_codes():
    lobe_to_group = {2: "frontal", 3: "insula-limbic", 4: "insula-limbic", 5: "occipital",
                     6: "parietal", 7: "subcortical", 8: "temporal", 9: "cerebellum"}
    lines = [line.split() for line in MRI_FILES[2].read_text().splitlines() if line.strip()]
    assert len(lines) == 116
    for _, region, code in lines:
        assert mri.GROUPS[mri.aal_group(region)] == lobe_to_group[int(code) // 1000], region
    with pytest.raises(UserError, match="no lobar group"):
        mri.aal_group("Corpus_Callosum")


@needs_mri
def test_mri_default_task_sizes_and_balance():
    started = time.perf_counter()
    task = load_task(OmegaConf.create({"name": "mri", "path": None, "image_size": 32, "max_train": None,
                                       "max_test": None, "train_fraction": 1.0, "seed": 0}))
    assert time.perf_counter() - started < 10
    assert task.class_names == mri.GROUPS and task.num_classes == 7
    assert task.train.images.shape == (4200, 1, 32, 32) and task.test.images.shape == (1050, 1, 32, 32)
    assert counts(task.train.labels, 7) == [600] * 7 and counts(task.test.labels, 7) == [150] * 7
    assert 0.0 <= task.train.images.min() and task.train.images.max() <= 1.0
    assert task.train.images.std() > 0.1  # real anatomy, not blank patches
    assert "hemisphere" in task.provenance["split_rule"] and "ch2.nii.gz" in task.provenance["source"]


@needs_mri
def test_mri_train_and_test_patches_share_no_voxel(volume):
    task, centres = mri.build_mri_task(volume, seed=0, image_size=mri.PATCH_MM)
    size, pad = mri.PATCH_MM, mri.PATCH_MM
    footprints = {}
    for split in ("train", "test"):
        mask = np.zeros(tuple(n + 2 * pad for n in volume.t1.shape[:2]) + volume.t1.shape[2:], dtype=bool)
        for (x0, y0), z in zip(mri.footprint_start(centres[split]) + pad, centres[split][:, 2]):
            mask[x0 : x0 + size, y0 : y0 + size, z] = True
        footprints[split] = mask
    assert footprints["train"].sum() > 500_000 and footprints["test"].sum() > 100_000
    assert not (footprints["train"] & footprints["test"]).any()
    # Every train voxel is left of the midline, every test voxel right of it.
    mid = mri.midline_index(volume) + pad
    assert not footprints["train"][mid - 1 :].any() and not footprints["test"][: mid + 2].any()

    # The footprints are what the images show: compare with direct crops of the T1.
    t1, groups = volume.t1, mri.group_volume(volume)
    for split, mirror in (("train", False), ("test", True)):
        for i in (0, len(centres[split]) // 2, len(centres[split]) - 1):
            x, y, z = centres[split][i]
            crop = t1[x - size // 2 : x + size // 2, y - size // 2 : y + size // 2, z].T[::-1]
            crop = crop[:, ::-1] if mirror else crop
            image = getattr(task, split).images[i, 0].numpy()
            assert np.array_equal(image, crop), (split, i)
            assert getattr(task, split).labels[i] == groups[x, y, z] - 1


@needs_mri
def test_mri_caps_fraction_and_seed():
    cfg = {"name": "mri", "max_train": 350, "max_test": 70, "train_fraction": 0.2, "seed": 5, "image_size": 16}
    task = load_task(cfg)
    assert task.train.images.shape == (70, 1, 16, 16)
    assert counts(task.train.labels, 7) == [10] * 7 and counts(task.test.labels, 7) == [10] * 7
    same = load_task(cfg)
    assert torch.equal(task.train.images, same.train.images) and torch.equal(task.test.images, same.test.images)
    other = load_task({**cfg, "seed": 6})
    assert not torch.equal(task.train.images, other.train.images)


def test_mri_missing_files_say_how_to_install(tmp_path):
    raises_user_error({"name": "mri", "path": str(tmp_path)}, "apt-get install mricron-data", "ch2.nii.gz")


def test_mri_volumes_on_different_grids_are_user_error(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "ch2.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 12), np.uint8), np.eye(4)), tmp_path / "aal.nii.gz")
    (tmp_path / "aal.nii.txt").write_text("1 Precentral_L 2001\n")
    raises_user_error({"name": "mri", "path": str(tmp_path)}, "same voxel grid")


def test_withheld_training_images_become_the_unlabelled_set():
    if not Path("/usr/share/mricron/templates/ch2.nii.gz").exists():
        pytest.skip("mricron-data not installed (apt-get install mricron-data)")
    base = {"name": "mri", "image_size": 16, "max_train": 140, "max_test": 14, "seed": 3}
    full = load_task(OmegaConf.create({**base, "train_fraction": 1.0}))
    scarce = load_task(OmegaConf.create({**base, "train_fraction": 0.2}))
    assert full.unlabelled is None
    assert len(scarce.train) + len(scarce.unlabelled) == len(full.train)
    # Labelled and withheld images together are exactly the full training set.
    together = torch.cat([scarce.train.images, scarce.unlabelled]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, full.train.images.flatten(1).tolist()))
    off = load_task(OmegaConf.create({**base, "train_fraction": 0.2, "unlabelled_transfer": False}))
    assert off.unlabelled is None
    with pytest.raises(UserError, match="unlabelled_transfer"):
        load_task(OmegaConf.create({**base, "unlabelled_transfer": "yes"}))
