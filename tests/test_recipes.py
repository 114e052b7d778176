"""Recipe losses with withheld labels (the data-scarce setting with a transfer set)."""

import pytest
import torch
from omegaconf import OmegaConf

from medkd.recipes import UNLABELLED, Batch, build_recipe, labelled_cross_entropy
from medkd.toolchain.models.students import build_student

NUM_CLASSES, TEACHER_DIM = 3, 8


def test_labelled_cross_entropy_ignores_unlabelled_rows():
    logits = torch.randn(6, NUM_CLASSES, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED, 1, 1])
    keep = labels != UNLABELLED
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(labelled_cross_entropy(logits, labels), expected)
    labelled_cross_entropy(logits, labels).backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.any(logits.grad[keep] != 0)


def test_all_unlabelled_batch_gives_zero_loss_not_nan():
    logits = torch.randn(4, NUM_CLASSES, requires_grad=True)
    loss = labelled_cross_entropy(logits, torch.full((4,), UNLABELLED))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def _recipe(name, **cfg):
    student = build_student(OmegaConf.create({"name": "mobilenetv3"}), NUM_CLASSES, 1, 16)
    return build_recipe(OmegaConf.create({"name": name, **cfg}), student, TEACHER_DIM)


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("rd", {"reprogram_hidden": 16, "teacher_ce_weight": 1.0, "cka_weight": 1.0}),
        ("kd", {"temperature": 4.0, "alpha": 0.5, "probe_epochs": 5, "probe_lr": 0.01}),
    ],
)
def test_distillation_learns_from_unlabelled_images(name, cfg):
    torch.manual_seed(0)
    recipe = _recipe(name, **cfg)
    assert recipe.uses_unlabelled
    features = torch.randn(6, TEACHER_DIM)
    labels = torch.tensor([0, 1, 2, UNLABELLED, UNLABELLED, UNLABELLED])
    recipe.prepare(features, labels)  # kd fits its probe on the three labelled rows only
    batch = Batch(torch.rand(3, 1, 16, 16), torch.full((3,), UNLABELLED), features[3:])
    loss, parts = recipe.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0  # the distillation term alone
    assert parts["ce"].item() == 0.0  # parts are detached tensors, read once per epoch by the loop
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.student.parameters())


def test_scratch_has_no_use_for_unlabelled_images():
    recipe = _recipe("scratch")
    assert not recipe.uses_unlabelled
