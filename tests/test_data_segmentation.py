"""Segmentation data: mri-seg's split and geometry, the label budget, seg-folder and seg-npz,
and one-line errors for bad masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medkd.toolchain.data import available_datasets, load_task
from medkd.toolchain.data.mri import MIDLINE_GAP, group_volume, midline_index
from medkd.toolchain.data.mri_seg import CLASS_NAMES, FOV_MM, field_of_view, slice_columns
from medkd.toolchain.data.mri_volume import read_mri_volume
from medkd.toolchain.data.registry import load_segmentation_task
from medkd.toolchain.data.segmentation import evenly_spaced, resize_masks
from medkd.toolchain.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def volume():
    return read_mri_volume()


def mri_seg(**keys):
    return load_segmentation_task({"name": "mri-seg", "image_size": 64, **keys})


# ---------------------------------------------------------------- mri-seg


def test_mri_seg_train_and_test_slices_lie_in_opposite_hemispheres(volume):
    groups = group_volume(volume)
    mid = midline_index(volume)
    columns = slice_columns(groups, mid)
    assert columns["train"].max() < mid - MIDLINE_GAP // 2 < mid + MIDLINE_GAP // 2 < columns["test"].min()
    assert not set(columns["train"]) & set(columns["test"])  # sagittal slices: no shared voxel
    task = mri_seg()
    assert len(task.train) == len(columns["train"]) and len(task.test) == len(columns["test"])
    # position = distance from the midline, so a test slice is the mirror of the train slice at that position
    assert task.train.position.tolist() == (mid - columns["train"]).tolist()
    assert task.test.position.tolist() == (columns["test"] - mid).tolist()


def test_mri_seg_pixels_are_the_volume_superior_up_anterior_right(volume):
    task = load_segmentation_task({"name": "mri-seg", "image_size": FOV_MM})  # 1 px per mm: no resampling
    groups = group_volume(volume)
    mid = midline_index(volume)
    y0, z0 = field_of_view(groups)
    index, row, col = 20, 50, 90
    x = mid - int(task.train.position[index])
    z, y = z0 + FOV_MM - 1 - row, y0 + col
    assert task.train.masks[index, row, col] == groups[x, y, z]
    assert task.train.images[index, 0, row, col] == pytest.approx(float(volume.t1[x, y, z]))


def test_mri_seg_has_background_and_every_lobar_group_in_both_splits():
    task = mri_seg()
    assert task.class_names == CLASS_NAMES and task.num_classes == 8
    for split in (task.train, task.test):
        assert split.images.shape[1:] == (1, 64, 64) and split.masks.shape[1:] == (64, 64)
        assert (torch.bincount(split.masks.reshape(-1), minlength=8) > 0).all()
        assert split.masks.max() < 8 and split.images.min() >= 0 and split.images.max() <= 1


# ---------------------------------------------------------------- label budget


def test_evenly_spaced_keeps_both_ends():
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(10, 1).tolist() == [5]
    assert evenly_spaced(3, 7).tolist() == [0, 1, 2]


def test_label_budget_is_evenly_spaced_by_position_and_the_same_for_every_seed():
    full = mri_seg()
    task = mri_seg(train_fraction=0.15)
    kept = round(0.15 * len(full.train))
    assert len(task.train) == kept and len(task.unlabelled) == len(full.train) - kept
    positions = task.train.position.tolist()
    assert positions[0] == full.train.position.min() and positions[-1] == full.train.position.max()
    gaps = np.diff(positions)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced to the nearest slice
    assert mri_seg(train_fraction=0.15, seed=3).train.position.tolist() == positions
    assert task.provenance["labelled_slice_positions"] == positions
    assert mri_seg(train_fraction=0.15, unlabelled_transfer=False).unlabelled is None


def test_masks_resize_nearest_neighbour():
    masks = torch.tensor([[[0, 0, 3, 3], [0, 0, 3, 3], [5, 5, 1, 1], [5, 5, 1, 1]]])
    assert resize_masks(masks, 2).tolist() == [[[0, 3], [5, 1]]]
    assert resize_masks(masks, 8).unique().tolist() == [0, 1, 3, 5]


def test_each_entry_point_refuses_the_other_kind_of_data_set():
    assert {"mri-seg", "seg-folder", "seg-npz"} <= set(available_datasets())
    with pytest.raises(ConfigError, match="segmentation data set"):
        load_task({"name": "mri-seg"})
    with pytest.raises(ConfigError, match="not a segmentation data set"):
        load_segmentation_task({"name": "mri"})


# ---------------------------------------------------------------- seg-folder


def write_pair(root, name, image, mask, mask_mode="L"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    mask_image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if mask_mode == "P":
        mask_image = mask_image.convert("P")
    mask_image.save(root / "masks" / f"{name}.png")


def square_mask(value: int, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[2:6, 2:6] = value
    return mask


def test_seg_folder_reads_pairs_in_natural_order_with_named_classes(tmp_path):
    for split in ("train", "test"):
        for i in (1, 2, 10):
            image = np.full((8, 8), 10 * i, dtype=np.uint8)
            write_pair(tmp_path / split, f"slice_{i}", image, square_mask(i % 3), "P" if i == 2 else "L")
    (tmp_path / "classes.txt").write_text("background\nliver\nkidney\n")
    task = load_segmentation_task({"name": "seg-folder", "path": str(tmp_path)})
    assert task.class_names == ["background", "liver", "kidney"]
    # natural order: slice_1, slice_2, slice_10 (not slice_1, slice_10, slice_2)
    assert [round(float(v) * 255) for v in task.train.images[:, 0, 0, 0]] == [10, 20, 100]
    assert task.train.masks[:, 4, 4].tolist() == [1, 2, 1] and task.train.masks[:, 0, 0].tolist() == [0, 0, 0]
    assert task.image_size == 8


def test_seg_folder_without_class_file_numbers_the_classes_and_resizes_masks(tmp_path):
    for i in range(5):
        write_pair(tmp_path, f"img{i}", np.zeros((16, 16), dtype=np.uint8), square_mask(2, 16))
    task = load_segmentation_task({"name": "seg-folder", "path": str(tmp_path), "image_size": 8})
    assert task.class_names == ["background", "class_1", "class_2"]
    assert len(task.train) + len(task.test) == 5
    assert task.train.masks.shape[1:] == (8, 8) and set(task.train.masks.unique().tolist()) == {0, 2}


@pytest.mark.parametrize("problem, fragment", [
    ("mask size", "a mask must match its image"),
    ("class id", "class id 4 but the class list has 3"),
    ("unreadable", "cannot read image"),
    ("missing mask", "has no file of the same name in masks/"),
    ("rgb mask", "a mask is one channel of class ids"),
])
def test_seg_folder_bad_input_is_one_line(tmp_path, problem, fragment):
    for i in range(3):
        write_pair(tmp_path, f"s{i}", np.zeros((8, 8), dtype=np.uint8), square_mask(1))
    (tmp_path / "classes.txt").write_text("background\na\nb\n")
    bad = tmp_path / "masks" / "s1.png"
    if problem == "mask size":
        Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(bad)
    elif problem == "class id":
        Image.fromarray(square_mask(4)).save(bad)
    elif problem == "unreadable":
        bad.write_bytes(b"not a png")
    elif problem == "missing mask":
        bad.unlink()
    elif problem == "rgb mask":
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(bad)
    with pytest.raises(UserError) as error:
        load_segmentation_task({"name": "seg-folder", "path": str(tmp_path)})
    assert fragment in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- seg-npz


def seg_arrays(n=4, size=8):
    masks = np.stack([square_mask(i % 3, size) for i in range(n)]).astype(np.int64)
    images = np.random.default_rng(0).integers(0, 255, (n, size, size)).astype(np.uint8)
    return {"train_images": images, "train_masks": masks, "test_images": images[:2], "test_masks": masks[:2]}


def test_seg_npz_loads_images_masks_and_class_names(tmp_path):
    path = tmp_path / "seg.npz"
    np.savez(path, **seg_arrays(), class_names=np.array(["bg", "a", "b"]))
    task = load_segmentation_task({"name": "seg-npz", "path": str(path), "train_fraction": 0.5})
    assert task.class_names == ["bg", "a", "b"]
    assert len(task.train) == 2 and len(task.unlabelled) == 2  # evenly spaced: file slices 0 and 3
    assert task.train.masks[:, 4, 4].tolist() == [0, 0] and task.test.masks[:, 4, 4].tolist() == [0, 1]


@pytest.mark.parametrize("change, fragment", [
    ({"train_masks": np.zeros((4, 8, 7), dtype=np.int64)}, "every image needs a mask of its own size"),
    ({"test_masks": np.full((2, 8, 8), -1)}, "ids start at 0"),
    ({"train_masks": np.zeros((4, 8, 8), dtype=np.float32)}, "integer class ids"),
])
def test_seg_npz_bad_masks_are_one_line(tmp_path, change, fragment):
    path = tmp_path / "seg.npz"
    np.savez(path, **{**seg_arrays(), **change})
    with pytest.raises(UserError, match=fragment):
        load_segmentation_task({"name": "seg-npz", "path": str(path)})


def test_seg_npz_ids_beyond_the_named_classes_are_refused(tmp_path):
    path = tmp_path / "seg.npz"
    np.savez(path, **seg_arrays(), class_names=np.array(["bg", "a"]))
    with pytest.raises(UserError, match="class_names has 2 names but labels go up to 2"):
        load_segmentation_task({"name": "seg-npz", "path": str(path)})
