"""Image folders: one sub-folder per class.

Layouts:
    root/train/<class>/*.png   and   root/test/<class>/*.png   the user's own split
    root/<class>/*.png                                        split 80/20 per class by seed

Class names are the folder names (sorted; a test/ class folder that train/ lacks is an
error unless data.allow_unseen_test_classes=true). Images are grayscale if every image is
single-channel, else RGB (gray images are replicated to 3 channels); alpha is dropped.
8-bit images are divided by 255; 16-bit, 32-bit integer and float images (PIL modes I;16,
I, F) map to [0, 1] by data.intensity (intensity.py), `range` taken from the training images
of those modes (all of them if training has none). Each image is resized to
image_size x image_size (aspect ratio not kept) as it is read, so folders of mixed image
sizes work; image_size null keeps the images' own size if they all share one square size.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, UserError
from .base import ImageSet, TaskData
from .config import DataConfig, native_image_size, required_path
from .intensity import IntensityRule, scale_to_unit
from .sampling import holdout_split
from .transforms import resize_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
TEST_FRACTION = 0.2
_GRAY_MODES = {"1", "L", "LA"}
# No fixed 0..1 scale (unlike 8-bit): data.intensity maps these.
RULE_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}


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
        # A test-only class gets an id too; validate.py refuses it unless allowed.
        class_names = sorted(set(train_files) | set(test_files))
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

    headers = {path: image_header(path) for path in all_paths}
    size = cfg.image_size or folder_image_size(headers, root)
    rule = cfg.intensity or IntensityRule("range")
    rule_paths = [p for p in all_paths if headers[p][0] in RULE_MODES]
    reference = [p for p in train_paths if headers[p][0] in RULE_MODES] or rule_paths
    low, high = rule.bounds(image_pixels(p) for p in reference) if rule_paths else (0.0, 1.0)
    images = {path: read_image(path, size, low, high) for path in all_paths}
    channels = 3 if any(image.shape[0] == 3 for image in images.values()) else 1

    def image_set(paths, labels) -> ImageSet:
        stacked = torch.stack([images[p].expand(channels, -1, -1) for p in paths])
        return ImageSet(stacked.contiguous(), torch.tensor(labels, dtype=torch.int64))

    return TaskData(
        name="folder",
        train=image_set(train_paths, train_labels),
        test=image_set(test_paths, test_labels),
        class_names=class_names,
        provenance={
            "source": str(root.resolve()),
            "split_rule": split_rule,
            "intensity": rule.describe(low, high) if rule_paths else "8-bit / 255",
        },
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


@contextmanager
def open_image(path: Path):
    """PIL image of `path`; any failure to decode it becomes a one-line UserError."""
    try:
        with Image.open(path) as image:
            yield image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


def image_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)), from the file header alone."""
    with open_image(path) as image:
        return image.mode, image.size


def folder_image_size(headers: dict[Path, tuple[str, tuple[int, int]]], root: Path) -> int:
    sizes = sorted({size for _, size in headers.values()})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        raise ConfigError(
            f"the images in {root} have {len(sizes)} sizes ({listed}); set data.image_size "
            "to the size they should be resized to"
        )
    width, height = sizes[0]
    return native_image_size(height, width, f"the images in {root}")


def image_pixels(path: Path) -> np.ndarray:
    with open_image(path) as image:
        return np.asarray(image, dtype=np.float32)


def read_image(path: Path, size: int, low: float, high: float) -> torch.Tensor:
    """One image as float32 C x size x size in [0, 1]; C is 1 (gray) or 3 (colour).

    Images of RULE_MODES map low..high to 0..1 (data.intensity); 8-bit ones are / 255.
    """
    with open_image(path) as image:
        if image.mode in RULE_MODES:
            array = scale_to_unit(np.asarray(image, dtype=np.float32), low, high)[None]
        elif image.mode in _GRAY_MODES:
            array = np.asarray(image.convert("L"), dtype=np.float32)[None] / 255.0
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return resize_images(torch.from_numpy(np.ascontiguousarray(array))[None], size)[0]
