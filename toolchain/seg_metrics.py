"""Segmentation scores: Dice and the 95th-percentile Hausdorff distance (HD95), per class.

The per-image values come from MONAI (`compute_dice`, `compute_hausdorff_distance`, edge
surface distances in mm with the given pixel spacing); this module adds what MONAI leaves
open, the policy for a class that is empty in the truth or the prediction of an image:

    both empty         the image says nothing about the class: left out of its mean (counted)
    one of them empty  Dice 0, HD95 = the image diagonal in mm, the largest distance the image
                       can hold (a miss or a false alarm is as bad as the worst boundary error;
                       MONAI would give NaN or inf, which would vanish from or swamp a mean)
    neither empty      MONAI's values

A class's score is the mean over the images where it appears in the truth or the prediction;
the mean over classes is over the foreground classes (1..K-1) that have any such image. The
report counts the `one_empty` and `both_empty` cases per class, so a reader sees how much of a
score the policy decided.
"""

from __future__ import annotations

import math
import warnings

import torch


def one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 N x H x W -> float N x K x H x W."""
    return torch.nn.functional.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()


def per_image_scores(pred: torch.Tensor, truth: torch.Tensor, num_classes: int,
                     spacing_mm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dice, hd95, truth present, prediction present), each N x (K-1) over the foreground classes;
    dice/hd95 NaN where both are empty (module docstring)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance  # heavy import: only when scoring

    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred and truth must both be N x H x W, got {tuple(pred.shape)} and {tuple(truth.shape)}")
    p, t = one_hot(pred, num_classes), one_hot(truth, num_classes)
    in_truth, in_pred = t[:, 1:].flatten(2).any(2), p[:, 1:].flatten(2).any(2)
    both = in_truth & in_pred
    dice = compute_dice(p, t, include_background=False, ignore_empty=False).float()
    hd95 = torch.full_like(dice, math.nan)
    if both.any():
        with warnings.catch_warnings():
            # MONAI warns about empty classes (the policy above handles them) and about an
            # argument its own code still passes; neither is the user's to act on.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95,
                                            spacing=spacing_mm).float()
        hd95 = torch.where(both, hd, hd95)
    one_empty = in_truth ^ in_pred
    diagonal = spacing_mm * math.hypot(*pred.shape[-2:])
    dice = torch.where(one_empty, torch.zeros_like(dice), dice)
    hd95 = torch.where(one_empty, torch.full_like(hd95, diagonal), hd95)
    neither = ~(in_truth | in_pred)
    dice = torch.where(neither, torch.full_like(dice, math.nan), dice)
    return dice, hd95, in_truth, in_pred


def segmentation_scores(pred: torch.Tensor, truth: torch.Tensor, class_names: list[str],
                        spacing_mm: float = 1.0) -> dict:
    """Mean Dice and HD95 (mm) per foreground class and over classes, with the empty-mask counts."""
    dice, hd95, in_truth, in_pred = per_image_scores(pred, truth, len(class_names), spacing_mm)
    per_class = {}
    for k, name in enumerate(class_names[1:]):
        scored = ~dice[:, k].isnan()
        per_class[name] = {
            "dice": float(dice[scored, k].mean()) if scored.any() else None,
            "hd95_mm": float(hd95[scored, k].mean()) if scored.any() else None,
            "images_scored": int(scored.sum()),
            "one_empty": int((in_truth[:, k] ^ in_pred[:, k]).sum()),
            "both_empty": int((~(in_truth[:, k] | in_pred[:, k])).sum()),
        }
    scored_classes = [c for c in per_class.values() if c["dice"] is not None]
    return {
        "mean_dice": sum(c["dice"] for c in scored_classes) / len(scored_classes) if scored_classes else None,
        "mean_hd95_mm": sum(c["hd95_mm"] for c in scored_classes) / len(scored_classes) if scored_classes else None,
        "pixel_agreement": float((pred == truth).float().mean()),
        "spacing_mm": spacing_mm,
        "empty_mask_policy": "both empty: not scored; one empty: Dice 0, HD95 = image diagonal",
        "per_class": per_class,
    }


def pooled_dice(logits, masks) -> float:
    """The export guard's segmentation metric (numpy, N x K x H x W logits and N x H x W masks):
    Dice of each foreground class over all pixels of the set pooled, averaged over the classes
    present in the truth or the prediction. Pooled rather than per image: cheap enough for the
    guard's many int8 candidates, and no empty-mask policy is needed."""
    import numpy as np

    predicted = logits.argmax(1)
    scores = []
    for k in range(1, logits.shape[1]):
        p, t = predicted == k, masks == k
        total = int(p.sum()) + int(t.sum())
        if total:
            scores.append(2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0
