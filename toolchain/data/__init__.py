"""The data layer: `load_task(cfg) -> TaskData` for every supported dataset.

`cfg` is the `data` config (OmegaConf DictConfig or a plain mapping) with keys name, path,
image_size, max_train, max_test, train_fraction, unlabelled_transfer, seed, intensity,
allow_unseen_test_classes, augment, augment_views; config.py documents each key and its
default. `augment` and `augment_views` do not change what load_task returns: they are the
training-time views (augment.py, `augmentation(cfg)`) that the training loop renders. Datasets: mri
(embedded default), ct (head CT levels), fashion-mnist, npz, folder, and multitask (several
of them in one TaskData with per-image task ids; its keys: multitask.py); see
available_datasets(). Every loaded data set (each task of a multitask one) passes the same
checks (validate.py), non-8-bit images one intensity rule (intensity.py), and its one-feature
intensity baseline is recorded (baseline.py).

Segmentation data (a class id per pixel: mri-seg, seg-folder, seg-npz) loads through
`load_segmentation_task(cfg) -> SegmentationTask` instead (segmentation.py): the same config
keys, with data.train_fraction as the label budget of evenly spaced slices.
"""

from .augment import augmentation
from .base import ImageSet, TaskData, TaskInfo
from .mri_volume import load_mri_volume
from .registry import available_datasets, load_segmentation_task, load_task
from .segmentation import MaskSet, SegmentationTask

__all__ = ["ImageSet", "MaskSet", "SegmentationTask", "TaskData", "TaskInfo", "augmentation", "available_datasets",
           "load_mri_volume", "load_segmentation_task", "load_task"]
