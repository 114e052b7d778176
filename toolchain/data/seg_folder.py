"""data=seg-folder: image/mask pairs in a folder.

Layouts (masks matched to images by file stem: images/case_7.jpg <-> masks/case_7.png):
    root/train/images/*, root/train/masks/*, root/test/images/*, root/test/masks/*   the user's split
    root/images/*, root/masks/*                    split 80/20 by seed (slices of one volume
                                                   would then share neighbours: give train/ and
                                                   test/ for those)

Masks are single-channel images of class ids (8-bit, 16-bit or palette PNG; 0 = background).
Class names: root/classes.txt, one per line, class 0 first; without it background, class_1,
... up to the largest id. Images are read as folder.py reads them (gray or RGB, data.intensity
for non-8-bit) and, with their masks (nearest-neighbour), resized to image_size as they are
read. Files keep their natural order (slice_2 before slice_10), which the label budget spaces
evenly (segmentation.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .config import DataConfig, required_path
from .folder import IMAGE_SUFFIXES, RULE_MODES, folder_image_size, image_header, image_pixels, open_image, read_image
from .intensity import IntensityRule
from .sampling import holdout_split
from .segmentation import MaskSet, SegmentationTask, check_masks, default_class_names, resize_masks

TEST_FRACTION = 0.2
CLASSES_FILE = "classes.txt"
# PIL modes that hold one integer per pixel: what a mask of class ids is stored as.
MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L"}


def natural_key(path: Path) -> list:
    """Sort key that orders slice_2 before slice_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def pairs_in(directory: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of directory/images and directory/masks, in natural order."""
    found = {}
    for kind in ("images", "masks"):
        folder = directory / kind
        if not folder.is_dir():
            raise UserError(f"{directory} has no {kind}/ folder; seg-folder expects {directory}/images/ "
                            f"and {directory}/masks/ (see data=seg-folder in the README)")
        files = [p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
        stems = {}
        for path in files:
            if path.stem in stems:
                raise UserError(f"{folder} has two files named {path.stem}.*; one per image")
            stems[path.stem] = path
        found[kind] = stems
    images, masks = found["images"], found["masks"]
    if not images:
        raise UserError(f"{directory / 'images'} has no images ({', '.join(IMAGE_SUFFIXES)})")
    for missing, has, other in ((set(images) - set(masks), "image", "masks"),
                                (set(masks) - set(images), "mask", "images")):
        if missing:
            name = sorted(missing)[0]
            raise UserError(f"{directory}: {has} '{name}' has no file of the same name in {other}/ "
                            f"({len(missing)} unmatched); every image needs its mask")
    return [(images[stem], masks[stem]) for stem in sorted(images, key=lambda s: natural_key(images[s]))]


def read_mask(path: Path) -> np.ndarray:
    """The class ids of a mask file, H x W int64; a one-line error for anything else."""
    with open_image(path) as mask:
        if mask.mode not in MASK_MODES:
            raise UserError(f"mask {path} is a {mask.mode} image; a mask is one channel of class ids "
                            "(8-bit, 16-bit or palette PNG)")
        return np.asarray(mask, dtype=np.int64)


def read_classes(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise UserError(f"{path} names {len(names)} class(es); give background and at least one more")
    return names


def load_seg_folder(cfg: DataConfig) -> SegmentationTask:
    root = required_path(cfg, "the folder of images/ and masks/")
    if not root.is_dir():
        raise UserError(f"segmentation folder not found: {root} (check data.path)")
    if (root / "train").is_dir() != (root / "test").is_dir():
        raise UserError(f"{root} has only one of train/ and test/; give both, or images/ and masks/ at the "
                        "root for an automatic 80/20 split")
    if (root / "train").is_dir():
        splits = {"train": pairs_in(root / "train"), "test": pairs_in(root / "test")}
        split_rule = "the folder's own train/ and test/ sub-folders"
    else:
        pairs = pairs_in(root)
        if len(pairs) < 2:
            raise UserError(f"{root} has 1 image; the automatic train/test split needs at least 2")
        train_index, test_index = holdout_split(np.zeros(len(pairs), dtype=np.int64), TEST_FRACTION, cfg.seed)
        splits = {"train": [pairs[i] for i in sorted(train_index)], "test": [pairs[i] for i in sorted(test_index)]}
        split_rule = f"80/20 of the pairs, seeded (seed {cfg.seed})"

    all_pairs = splits["train"] + splits["test"]
    headers = {image: image_header(image) for image, _ in all_pairs}
    for image, mask in all_pairs:
        mask_size = image_header(mask)[1]
        if mask_size != headers[image][1]:
            raise UserError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} px but its image {image.name} is "
                            f"{headers[image][1][0]}x{headers[image][1][1]}; a mask must match its image")
    size = cfg.image_size or folder_image_size(headers, root)
    rule = cfg.intensity or IntensityRule("range")
    rule_images = [image for image, _ in all_pairs if headers[image][0] in RULE_MODES]
    reference = [image for image, _ in splits["train"] if headers[image][0] in RULE_MODES] or rule_images
    low, high = rule.bounds(image_pixels(p) for p in reference) if rule_images else (0.0, 1.0)

    masks = {mask: read_mask(mask) for _, mask in all_pairs}
    class_names = read_classes(root) or default_class_names(max(int(m.max()) for m in masks.values()))
    images = {image: read_image(image, size, low, high) for image, _ in all_pairs}
    channels = 3 if any(image.shape[0] == 3 for image in images.values()) else 1

    def mask_set(pairs) -> MaskSet:
        for _, mask in pairs:
            check_masks((1, *masks[mask].shape), masks[mask][None], len(class_names), f"mask {mask}")
        stacked = torch.stack([images[image].expand(channels, -1, -1) for image, _ in pairs]).contiguous()
        ids = torch.cat([resize_masks(torch.from_numpy(masks[mask])[None], size) for _, mask in pairs])
        return MaskSet(stacked, ids)

    return SegmentationTask(
        name="seg-folder",
        train=mask_set(splits["train"]),
        test=mask_set(splits["test"]),
        class_names=class_names,
        provenance={
            "source": str(root.resolve()),
            "split_rule": split_rule,
            "classes": CLASSES_FILE if (root / CLASSES_FILE).is_file() else "numbered (no classes.txt)",
            "intensity": rule.describe(low, high) if rule_images else "8-bit / 255",
        },
    )

