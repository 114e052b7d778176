"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzipped IDX files).

Default location /usr/share/datasets/fashion-mnist; data.path may name another directory
holding the same four files. 60,000 train / 10,000 test 28 x 28 grayscale images, 10 classes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import ImageSet, TaskData
from .config import DataConfig
from .transforms import to_nchw_float

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# IDX magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def load_fashion_mnist(cfg: DataConfig) -> TaskData:
    directory = cfg.path or DEFAULT_DIR
    wanted = [directory / name for pair in FILES.values() for name in pair]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        raise UserError(
            f"Fashion-MNIST file(s) {', '.join(missing)} not found in {directory}; run "
            "`apt-get install dataset-fashion-mnist` or set data.path to a directory holding them"
        )
    sets = {}
    for split, (images_name, labels_name) in FILES.items():
        images = read_idx(directory / images_name, IMAGES_MAGIC)
        labels = read_idx(directory / labels_name, LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(
                f"{directory / images_name} has {len(images)} images but {labels_name} has "
                f"{len(labels)} labels; the files do not belong together"
            )
        if labels.max() >= len(CLASS_NAMES):
            raise UserError(
                f"{directory / labels_name} has label {labels.max()}; Fashion-MNIST has 10 classes"
            )
        sets[split] = ImageSet(to_nchw_float(images), torch.from_numpy(labels.astype(np.int64)))
    return TaskData(
        name="fashion-mnist",
        train=sets["train"],
        test=sets["test"],
        class_names=list(CLASS_NAMES),
        provenance={
            "source": str(directory),
            "split_rule": "the official 60,000 train / 10,000 test (t10k) files",
        },
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes, checking its magic number and length."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot decompress {path}: {exc}; reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        found = data[:4].hex() if len(data) >= 4 else "a truncated header"
        raise UserError(
            f"{path} is not an IDX file of the expected kind: magic {found}, expected {magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated: its IDX header needs {header} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise UserError(f"{path} has {len(data)} bytes but its header {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable for torch
