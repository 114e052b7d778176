"""Image folders: one sub-folder per class.

Layouts:
    root/train/<class>/*.png   and   root/test/<class>/*.png   the user's own split
    root/<class>/*.png                                        split 80/20 per class by seed

Class names are the folder names (sorted; the train folders define the classes). Images
are grayscale if every image is single-channel, else RGB (gray images are replicated to 3
channels); alpha is dropped. Each image is resized to image_size x image_size (aspect
ratio not kept) as it is read, so folders of mixed image sizes work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .base import ImageSet, TaskData
from .config import DataConfig, required_path
from .sampling import holdout_split
from .transforms import resize_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
TEST_FRACTION = 0.2
_GRAY_MODES = {"1", "L", "LA"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L"}


def load_folder(cfg: DataConfig) -> TaskData:
    root = required_path(cfg, "the image folder root")
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (check data.path)")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise UserError(
            f"{root} has a {present}/ folder but no {absent}/ folder; give both, or put the "
            "class folders directly under the root for an automatic 80/20 split"
        )

    if has_train:
        train_files = _class_files(root / "train")
        test_files = _class_files(root / "test")
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise UserError(
                f"{root / 'test'} has class folder(s) {', '.join(unknown)} that {root / 'train'} "
                "lacks; every test class needs training images"
            )
        class_names = sorted(train_files)
        train_paths, train_labels = _flatten(train_files, class_names)
        test_paths, test_labels = _flatten(test_files, class_names)
        all_paths = train_paths + test_paths
        split_rule = "the folder's own train/ and test/ sub-folders"
    else:
        files = _class_files(root)
        for name, paths in files.items():
            if len(paths) < 2:
                raise UserError(
                    f"class folder {root / name} has only 1 image; the automatic train/test "
                    "split needs at least 2 per class"
                )
        class_names = sorted(files)
        all_paths, labels = _flatten(files, class_names)
        train_index, test_index = holdout_split(np.array(labels), TEST_FRACTION, cfg.seed)
        train_labels, test_labels = [labels[i] for i in train_index], [labels[i] for i in test_index]
        train_paths, test_paths = [all_paths[i] for i in train_index], [all_paths[i] for i in test_index]
        split_rule = f"80/20 per class, seeded (seed {cfg.seed})"

    images = {path: _read_image(path, cfg.image_size) for path in all_paths}
    channels = 3 if any(image.shape[0] == 3 for image in images.values()) else 1

    def image_set(paths, labels) -> ImageSet:
        stacked = torch.stack([images[p].expand(channels, -1, -1) for p in paths])
        return ImageSet(stacked.contiguous(), torch.tensor(labels, dtype=torch.int64))

    return TaskData(
        name="folder",
        train=image_set(train_paths, train_labels),
        test=image_set(test_paths, test_labels),
        class_names=class_names,
        provenance={"source": str(root.resolve()), "split_rule": split_rule},
    )


def _class_files(directory: Path) -> dict[str, list[Path]]:
    """{class folder name: its image files}, refusing an empty layout or an empty class."""
    class_dirs = sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"no class folders in {directory}; expected {directory}/<class>/<image> "
            "(or train/<class>/... and test/<class>/...)"
        )
    files = {}
    for class_dir in class_dirs:
        paths = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise UserError(
                f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        files[class_dir.name] = paths
    return files


def _flatten(files: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for name, class_paths in files.items():
        paths += class_paths
        labels += [class_names.index(name)] * len(class_paths)
    return paths, labels


def _read_image(path: Path, size: int) -> torch.Tensor:
    """One image as float32 C x size x size in [0, 1]; C is 1 (gray) or 3 (colour)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES:
                array = np.asarray(image, dtype=np.float32)[None] / 65535.0
            elif image.mode in _GRAY_MODES:
                array = np.asarray(image.convert("L"), dtype=np.float32)[None] / 255.0
            elif image.mode == "F":
                raise UserError(
                    f"cannot use {path}: 32-bit float images have no known 0..1 scale; "
                    "save it as 8- or 16-bit"
                )
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None
    tensor = torch.from_numpy(np.clip(array, 0.0, 1.0))
    return resize_images(tensor[None], size)[0]
