"""Dice and HD95 against values worked out by hand on 8 x 8 masks, and the empty-mask policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.toolchain.seg_metrics import segmentation_scores

CLASSES = ["background", "a", "b"]


def masks():
    """Image 0: class a predicted as a 3x3 square inside a 4x4 truth square, class b nowhere.
    Image 1: class a one pixel 3 px off; class b in the truth only (a miss)."""
    pred, truth = torch.zeros(2, 8, 8, dtype=torch.int64), torch.zeros(2, 8, 8, dtype=torch.int64)
    pred[0, 2:5, 2:5] = 1
    truth[0, 2:6, 2:6] = 1
    truth[1, 0, 0], pred[1, 0, 3] = 1, 1
    truth[1, 7, 7] = 2
    return pred, truth


def square_hd95() -> float:
    """HD95 of image 0, class a, from the edge pixels (MONAI's surface: pixels with a
    neighbour outside the mask). 3x3 edge -> nearest 4x4 edge: 0 for the 5 pixels on row/col 2,
    1 for (3,4), (4,3), (4,4). 4x4 edge -> nearest 3x3 edge: 0 for the 5 shared pixels, 1 for
    (2,5), (3,5), (4,5), (5,2), (5,3), (5,4), sqrt(2) for (5,5)."""
    pred_to_truth = [0, 0, 0, 0, 0, 1, 1, 1]
    truth_to_pred = [0] * 5 + [1] * 6 + [math.sqrt(2)]
    return max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))


def test_dice_and_hd95_per_class_by_hand():
    scores = segmentation_scores(*masks(), CLASSES)
    a, b = scores["per_class"]["a"], scores["per_class"]["b"]
    dice_square = 2 * 9 / (9 + 16)  # |P & T| = 9, |P| = 9, |T| = 16
    assert a["dice"] == pytest.approx((dice_square + 0.0) / 2)
    assert a["hd95_mm"] == pytest.approx((square_hd95() + 3.0) / 2, abs=1e-4)  # one pixel, 3 px away
    assert (a["images_scored"], a["one_empty"], a["both_empty"]) == (2, 0, 0)
    # b: a miss on image 1 (Dice 0, HD95 = the 8 x 8 diagonal); image 0 has none of it: not scored
    assert b["dice"] == 0.0 and b["hd95_mm"] == pytest.approx(math.hypot(8, 8))
    assert (b["images_scored"], b["one_empty"], b["both_empty"]) == (1, 1, 1)
    assert scores["mean_dice"] == pytest.approx((a["dice"] + b["dice"]) / 2)
    assert scores["mean_hd95_mm"] == pytest.approx((a["hd95_mm"] + b["hd95_mm"]) / 2)
    pred, truth = masks()
    assert scores["pixel_agreement"] == pytest.approx(float((pred == truth).sum()) / pred.numel())


def test_distances_scale_with_the_pixel_spacing():
    one, two = (segmentation_scores(*masks(), CLASSES, spacing_mm=s)["per_class"] for s in (1.0, 2.0))
    assert two["a"]["hd95_mm"] == pytest.approx(2 * one["a"]["hd95_mm"], abs=1e-4)
    assert two["b"]["hd95_mm"] == pytest.approx(2 * one["b"]["hd95_mm"])
    assert two["a"]["dice"] == one["a"]["dice"]


def test_a_perfect_prediction_and_a_false_alarm():
    _, truth = masks()
    perfect = segmentation_scores(truth, truth, CLASSES)
    assert perfect["mean_dice"] == 1.0 and perfect["mean_hd95_mm"] == 0.0
    alarm = truth.clone()
    alarm[0, 0, 7] = 2  # b predicted where the truth has none
    b = segmentation_scores(alarm, truth, CLASSES)["per_class"]["b"]
    assert b["one_empty"] == 1 and b["images_scored"] == 2 and b["dice"] == pytest.approx(0.5)


def test_a_class_absent_everywhere_is_not_scored():
    empty = torch.zeros(1, 8, 8, dtype=torch.int64)
    scores = segmentation_scores(empty, empty, CLASSES)
    assert scores["mean_dice"] is None and scores["per_class"]["a"]["both_empty"] == 1
