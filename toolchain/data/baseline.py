"""How far one number per image, its mean intensity, gets on a task: the floor a model must beat.

A label that brightness alone predicts (a dense lesion, a bright organ) lets a model score
well by learning brightness. `intensity_baseline` measures that shortcut for every task
(load_task records it as provenance["intensity_baseline"], so the run report shows it): the
feature is each image's mean value in [0, 1] (over all pixels and channels), and two
classifiers on that one feature are fitted on the training split and scored on the test split:

    nearest_class_mean  predict the class whose mean training feature is closest
    binned_majority     cut the feature at BINS training quantiles and predict the most
                        frequent training class of each bin: any rule of the form "intensity
                        in this range -> that class" on this resolution, including the best
                        single threshold of a two-class task
    majority_class      always predict the most frequent training class (no feature at all)

Ties go to the lower class id. Training images whose label is withheld (UNLABELLED) are left
out of the fit.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 16


def mean_intensity(images: torch.Tensor) -> np.ndarray:
    """One float per image: its mean over channels and pixels."""
    return images.reshape(len(images), -1).float().mean(1).numpy().astype(np.float64)


def intensity_baseline(train_images: torch.Tensor, train_labels: torch.Tensor,
                       test_images: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """Test accuracy of the one-feature classifiers fitted on the training split (see above)."""
    train_x, train_y = mean_intensity(train_images), train_labels.numpy()
    labelled = train_y >= 0
    train_x, train_y = train_x[labelled], train_y[labelled]
    test_x, test_y = mean_intensity(test_images), test_labels.numpy()
    classes = np.unique(train_y)
    if len(classes) == 0 or len(test_y) == 0:
        return {}
    majority = classes[np.argmax([np.sum(train_y == c) for c in classes])]
    results = {
        "feature": "mean image intensity",
        "fitted_on": "train",
        "evaluated_on": "test",
        "majority_class": _accuracy(np.full(len(test_y), majority), test_y),
        "nearest_class_mean": _accuracy(nearest_class_mean(train_x, train_y, test_x), test_y),
        "binned_majority": _accuracy(binned_majority(train_x, train_y, test_x), test_y),
        "bins": BINS,
    }
    results["best"] = max(results["nearest_class_mean"], results["binned_majority"])
    return results


def nearest_class_mean(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    classes = np.unique(train_y)
    means = np.array([train_x[train_y == c].mean() for c in classes])
    return classes[np.abs(test_x[:, None] - means[None, :]).argmin(1)]  # argmin: first (lowest) on ties


def binned_majority(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    bins: int = BINS) -> np.ndarray:
    classes = np.unique(train_y)
    edges = np.unique(np.quantile(train_x, np.linspace(0, 1, bins + 1)[1:-1]))
    train_bin, test_bin = np.searchsorted(edges, train_x), np.searchsorted(edges, test_x)
    overall = classes[np.argmax([np.sum(train_y == c) for c in classes])]
    vote = np.full(len(edges) + 1, overall)
    for b in range(len(edges) + 1):
        members = train_y[train_bin == b]
        if len(members):
            vote[b] = classes[np.argmax([np.sum(members == c) for c in classes])]
    return vote[test_bin]


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return round(float(np.mean(predicted == labels)), 4)
