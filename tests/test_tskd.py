"""TS-KD's losses against hand-computed values on tiny batches, term by term, and one epoch of
each training stage through the shared training loop."""

from __future__ import annotations

import math

import pytest
import torch

from medkd.recipes import Batch
from medkd.recipes.tskd import (SupervisedSegmentation, TeacherTargets, TransferDistillation, feature_loss,
                                mask_kl, segmentation_loss, soft_dice_loss)
from medkd.toolchain.checkpoint import CHECKPOINT_NAME
from medkd.toolchain.data.segmentation import MaskSet
from medkd.toolchain.models.segmenters import build_segmenter
from medkd.toolchain.train import TrainSettings, fit


def two_pixels():
    """One image of 1 x 2 pixels, 2 classes. Pixel a: logits (0, ln 3) -> p(class 1) = 3/4,
    truth 1. Pixel b: logits (0, 0) -> p(class 1) = 1/2, truth 0."""
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])  # N x K x H x W = 1 x 2 x 1 x 2
    masks = torch.tensor([[[1, 0]]])
    return logits, masks


def test_soft_dice_counts_foreground_classes_only():
    logits, masks = two_pixels()
    # class 1: overlap 3/4, sum p = 3/4 + 1/2, sum t = 1 -> Dice 1.5 / 2.25 (background not averaged in)
    assert soft_dice_loss(logits, masks).item() == pytest.approx(1 - 1.5 / 2.25, abs=1e-5)
    perfect = torch.tensor([[[[-20.0, 20.0]], [[20.0, -20.0]]]])
    assert soft_dice_loss(perfect, masks).item() == pytest.approx(0.0, abs=1e-5)


def test_segmentation_loss_weights_cross_entropy_and_dice():
    logits, masks = two_pixels()
    ce = (-math.log(3 / 4) - math.log(1 / 2)) / 2  # mean over the two pixels
    dice = 1 - 1.5 / 2.25
    total, parts = segmentation_loss(logits, masks, ce_weight=2.0, dice_weight=3.0)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert parts["dice_loss"].item() == pytest.approx(dice, abs=1e-5)
    assert total.item() == pytest.approx(2 * ce + 3 * dice, abs=1e-5)


def test_mask_kl_is_temperature_squared_kl_from_the_teacher_averaged_over_pixels():
    # pixel a: teacher (0, 2 ln 3) / T=2 -> (1/4, 3/4), student (0, 0) -> (1/2, 1/2); pixel b: equal
    teacher = torch.tensor([[[[0.0, 1.0]], [[2 * math.log(3), 1.0]]]])
    student = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])
    kl_a = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert mask_kl(student, teacher, temperature=2.0).item() == pytest.approx(4 * kl_a / 2, abs=1e-6)
    assert mask_kl(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_loss_is_the_mean_squared_difference():
    assert feature_loss(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 4.0]]])).item() == pytest.approx(2.5)


def test_teacher_targets_pool_the_embedding_to_the_student_grid_and_keep_the_logits():
    targets = TeacherTargets(channels=2, grid=2, num_classes=3, size=4)
    embedding = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    logits = torch.randn(1, 3, 4, 4)
    rows = targets.pack(embedding, logits)
    assert rows.shape == (1, targets.width) == (1, 2 * 2 * 2 + 3 * 16)
    tokens, back = targets.split(rows)
    # token 0 (top-left 2 x 2 block): channel 0 mean of 0, 1, 4, 5; channel 1 of 16, 17, 20, 21
    assert tokens[0, 0].tolist() == [2.5, 18.5] and tokens.shape == (1, 4, 2)
    assert tokens[0, 3].tolist() == [12.5, 28.5]  # bottom-right block
    assert torch.equal(back, logits)
    assert TeacherTargets(2, 2).split(TeacherTargets(2, 2).pack(embedding))[1] is None


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_segmenter({"name": "vit_tiny_seg", "patch_size": 8}, 3, 1, 32)


def tiny_masks(n=4, size=32):
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    masks[:, 8:20, 8:20] = 1
    masks[:, 22:, 22:] = 2
    images = masks[:, None].float() / 2 + 0.05 * torch.rand(n, 1, size, size)
    return MaskSet(images, masks)


def test_transfer_distillation_adds_the_mask_term_only_with_teacher_logits(student):
    images = torch.rand(2, 1, 32, 32)
    with_logits = TeacherTargets(channels=8, grid=student.grid, num_classes=3, size=32)
    rows = with_logits.pack(torch.randn(2, 8, 8, 8), torch.randn(2, 3, 32, 32))
    recipe = TransferDistillation(student, with_logits, feature_weight=2.0, logit_weight=3.0, temperature=2.0)
    total, parts = recipe.loss(Batch(images, torch.zeros(2, 32, 32, dtype=torch.int64), rows))
    assert set(parts) == {"feature_loss", "mask_kl"}
    assert total.item() == pytest.approx(2 * parts["feature_loss"].item() + 3 * parts["mask_kl"].item(), rel=1e-5)
    features_only = TeacherTargets(channels=8, grid=student.grid)
    recipe = TransferDistillation(student, features_only, feature_weight=2.0)
    total, parts = recipe.loss(Batch(images, torch.zeros(2, 32, 32, dtype=torch.int64),
                                     features_only.pack(torch.randn(2, 8, 8, 8))))
    assert set(parts) == {"feature_loss"} and total.item() == pytest.approx(2 * parts["feature_loss"].item())


def test_supervised_segmentation_learns_through_the_shared_training_loop(student, tmp_path):
    data = tiny_masks()
    recipe = SupervisedSegmentation(student)
    result = fit(recipe, data, None, TrainSettings(epochs=8, batch_size=2, lr=1e-3, weight_decay=0.0, seed=0,
                                                    progress=False), tmp_path, "test", log=lambda line: None)
    history = result.history
    assert len(history) == 8 and {"ce", "dice_loss"} <= set(history[0])
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert (tmp_path / CHECKPOINT_NAME).is_file()  # checkpointed (resumable) like every recipe
