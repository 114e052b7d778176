"""The `data` config: its keys, their defaults, and the checks on every value.

Keys (all optional; a missing key takes its default):

    name            str        "mri"   one of: mri (embedded default, Colin27 T1 patches),
                                       ct (head CT level patches), fashion-mnist, npz
                                       (MedMNIST format), folder; multitask has keys of its
                                       own (multitask.py); segmentation: mri-seg, seg-folder,
                                       seg-npz (segmentation.py)
    path            str|null   null    npz: the .npz file; folder: the root directory;
                                       mri / fashion-mnist: a directory that replaces the
                                       Debian install location; ct: the .inv3 file (null =
                                       use the Debian files)
    image_size      int|null   null    images are resized (bilinear, antialias) to
                                       image_size x image_size; 8 <= image_size <= 1024;
                                       null = the data set's own size (it must be square)
    max_train       int|null   null    cap on the training split, stratified by class
    max_test        int|null   null    cap on the test split, stratified by class
    train_fraction  float      1.0     in (0, 1]: keep this fraction of the training labels per
                                       class (at least 1 per class); applied after max_train
    unlabelled_transfer bool   true    with train_fraction < 1, keep the other training images
                                       (labels withheld) as an unlabelled transfer set for the
                                       distillation recipes
    seed            int        0       makes every subsample and split deterministic
    intensity       str|null   null    how images that are not 8-bit map to [0, 1]: range or
                                       window:LEVEL,WIDTH (see intensity.py); null = range,
                                       except mri: its robust window of the head voxels,
                                       and ct: window:40,400
    allow_unseen_test_classes  false   true keeps test images of classes that the training
                    bool               split lacks (else an error; see validate.py)
    augment         str|null   null    training-time augmentation: null/none, a preset or a
                                       spec such as "crop=0.8,hflip,rotate=10,jitter=0.1"
                                       (augment.py; the data set YAMLs set their own default)
    augment_views   int        2       fixed views per training image when augmenting, the
                                       first being the image itself (augment.py)

Config problems raise `ConfigError` (a `UserError`), one line naming the key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .augment import DEFAULT_VIEWS, AugmentSpec, parse_augment, parse_views
from .intensity import IntensityRule, parse_intensity

DEFAULTS = {
    "name": "mri",
    "path": None,
    "image_size": None,
    "max_train": None,
    "max_test": None,
    "train_fraction": 1.0,
    "unlabelled_transfer": True,
    "seed": 0,
    "intensity": None,
    "allow_unseen_test_classes": False,
    "augment": None,
    "augment_views": DEFAULT_VIEWS,
}

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class DataConfig:
    """A validated `data` config; loaders receive this, never the raw mapping."""

    name: str
    path: Path | None
    image_size: int | None  # None: the data set's own size
    max_train: int | None
    max_test: int | None
    train_fraction: float
    unlabelled_transfer: bool
    seed: int
    intensity: IntensityRule | None  # None: the data set's default
    allow_unseen_test_classes: bool
    augment: AugmentSpec | None = None  # None: no augmentation (training only; see augment.py)
    augment_views: int = DEFAULT_VIEWS


def parse_data_config(cfg, valid_names: list[str]) -> DataConfig:
    """Check every value of `cfg` (DictConfig or mapping) and return a DataConfig."""
    values = with_defaults(cfg, DEFAULTS)

    name = values["name"]
    if name not in valid_names:
        raise ConfigError(f"unknown data.name '{name}'; choose one of: {', '.join(valid_names)}")

    path = values["path"]
    if path == "???":  # OmegaConf's marker for a mandatory value nobody filled in
        path = None
    if path is not None:
        if not isinstance(path, (str, Path)) or str(path).strip() == "":
            raise ConfigError(f"data.path must be a file or directory path or null, got '{path}'")
        path = Path(path).expanduser()

    image_size = values["image_size"]
    if image_size is not None and (
        not _is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ConfigError(
            f"data.image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} or null "
            f"(the data set's own size), got '{image_size}'"
        )

    for key in ("max_train", "max_test"):
        cap = values[key]
        if cap is not None and (not _is_int(cap) or cap < 1):
            raise ConfigError(f"data.{key} must be a positive integer or null, got '{cap}'")

    fraction = values["train_fraction"]
    if (
        not isinstance(fraction, (int, float))
        or isinstance(fraction, bool)
        or not 0.0 < fraction <= 1.0
    ):
        raise ConfigError(
            f"data.train_fraction must be a number in (0, 1], e.g. 0.1, got '{fraction}'"
        )

    if not isinstance(values["unlabelled_transfer"], bool):
        raise ConfigError(
            f"data.unlabelled_transfer must be true or false, got '{values['unlabelled_transfer']}'"
        )

    seed = values["seed"]
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"data.seed must be a non-negative integer, got '{seed}'")

    if not isinstance(values["allow_unseen_test_classes"], bool):
        raise ConfigError(
            "data.allow_unseen_test_classes must be true or false, "
            f"got '{values['allow_unseen_test_classes']}'"
        )

    return DataConfig(
        name=name,
        path=path,
        image_size=None if image_size is None else int(image_size),
        max_train=values["max_train"],
        max_test=values["max_test"],
        train_fraction=float(fraction),
        unlabelled_transfer=values["unlabelled_transfer"],
        seed=int(seed),
        intensity=parse_intensity(values["intensity"]),
        allow_unseen_test_classes=values["allow_unseen_test_classes"],
        augment=parse_augment(values["augment"]),
        augment_views=parse_views(values["augment_views"]),
    )


def with_defaults(cfg, defaults: dict, context: str = "") -> dict:
    """`cfg` as a plain dict over `defaults`; a key `defaults` lacks is a one-line ConfigError."""
    raw = config_mapping(cfg)
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown data key(s){context}: {', '.join(unknown)}; valid keys: {', '.join(defaults)}")
    return {**defaults, **raw}


def config_mapping(cfg) -> dict:
    """`cfg` (DictConfig or mapping) as a plain dict of plain values."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            # resolve=True so interpolations like ${seed} arrive as values.
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # omegaconf is a dependency, but plain dicts need nothing else
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"the data config must be a mapping of keys to values, got {type(cfg).__name__}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def required_path(cfg: DataConfig, what: str) -> Path:
    """`cfg.path`, which this dataset cannot do without."""
    if cfg.path is None:
        raise ConfigError(f"data.path is required for data.name={cfg.name}: give {what} (data.path=...)")
    return cfg.path


def native_image_size(height: int, width: int, what: str) -> int:
    """The size `data.image_size: null` keeps: the images' own, if square and within bounds."""
    if height != width:
        raise ConfigError(
            f"{what} are {width}x{height} px, not square; set data.image_size to the size "
            "the model should see (images are resized to image_size x image_size)"
        )
    if not MIN_IMAGE_SIZE <= height <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"{what} are {width}x{height} px, outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}; set "
            "data.image_size to resize them"
        )
    return height
