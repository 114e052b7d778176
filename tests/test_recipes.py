"""Recipe losses with withheld labels (the data-scarce setting with a transfer set), and rd's
settings: its switches, one-line errors for bad values, per-module learning rates. The loss
values themselves are pinned by hand in test_recipe_losses.py."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.recipes import UNLABELLED, Batch, build_recipe, labelled_cross_entropy
from medkd.toolchain.config import load_config
from medkd.toolchain.data.base import ImageSet
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.models.students import Student, build_student
from medkd.toolchain.train import TrainSettings, fit

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


# --------------------------------------------------------------------------- rd settings


RD_CFG = {"reprogram_hidden": 16, "teacher_ce_weight": 1.0, "cka_weight": 1.0}


def test_rd_switches_from_the_command_line_reach_the_recipe():
    overrides = {"cka_detach_teacher": True, "logit_weight": 0.3, "logit_when": "always", "logit_temperature": 2.5,
                 "reprogram_lr_scale": 4.0, "head_lr_scale": 0.25}
    cfg = load_config(["recipe=rd", *(f"recipe.{k}={str(v).lower()}" for k, v in overrides.items())]).recipe
    recipe = build_recipe(cfg, build_student(OmegaConf.create({"name": "mobilenetv3"}), NUM_CLASSES, 1, 16),
                          TEACHER_DIM)
    assert {key: getattr(recipe, key) for key in overrides} == overrides


def test_rd_config_without_the_switches_is_the_paper_defaults_arm():
    """Configs written before the switches existed keep the old loss and one learning rate."""
    recipe = _recipe("rd", **RD_CFG)
    assert recipe.cka_detach_teacher is False and recipe.logit_weight == 0.0
    assert [g["lr"] for g in recipe.parameter_groups(0.01)] == [0.01, 0.01, 0.01]



@pytest.mark.parametrize("key, value, fragment", [
    ("reprogram_hidden", 0, "recipe.reprogram_hidden must be a positive integer"),
    ("teacher_ce_weight", -1.0, "recipe.teacher_ce_weight must be a number >= 0"),
    ("cka_weight", "high", "recipe.cka_weight must be a number >= 0"),
    ("logit_weight", -0.5, "recipe.logit_weight must be a number >= 0"),
    ("logit_temperature", 0.0, "recipe.logit_temperature must be a number > 0"),
    ("reprogram_lr_scale", 0, "recipe.reprogram_lr_scale must be a number > 0"),
    ("head_lr_scale", float("nan"), "recipe.head_lr_scale must be a number > 0"),
    ("cka_detach_teacher", "yes", "recipe.cka_detach_teacher must be true or false"),
    ("logit_when", "sometimes", "recipe.logit_when must be one of transfer_set, always"),
])
def test_rd_bad_settings_are_one_line_config_errors(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        _recipe("rd", **{**RD_CFG, key: value})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _tiny_rd(**cfg):
    """A BatchNorm-free 1x4x4 -> 4 -> 3 student inside the real rd recipe."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh())
    student = Student("tiny", "mlp", backbone, 4, NUM_CLASSES, 1, 4)
    return build_recipe(OmegaConf.create({"name": "rd", **RD_CFG, **cfg}), student, TEACHER_DIM)


def test_rd_parameter_groups_cover_every_parameter_once_at_its_own_rate():
    recipe = _tiny_rd(reprogram_lr_scale=3.0, head_lr_scale=0.5)
    groups = recipe.parameter_groups(0.01)
    assert [g["lr"] for g in groups] == pytest.approx([0.03, 0.005, 0.01])
    reprogram, head, backbone = ({id(p) for p in g["params"]} for g in groups)
    assert reprogram == {id(p) for p in recipe.reprogram.parameters()}
    assert head == {id(p) for p in recipe.student.head.parameters()}
    assert backbone == {id(p) for p in recipe.student.backbone.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(recipe.parameters()))


@pytest.mark.parametrize("labels, has_kl", [([0, 1, 2, 0, 1, 2, 0, 1], False),
                                             ([0, 1, 2, 0, 1, 2, UNLABELLED, UNLABELLED], True)])
def test_rd_default_logit_term_follows_the_training_set_in_fit(tmp_path, labels, has_kl):
    """rd.yaml's default (logit_when=transfer_set): the term is trained and logged only when
    the training set fit() gets holds images with withheld labels."""
    cfg = load_config(["recipe=rd"]).recipe
    student = Student("tiny", "mlp", nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), 4, NUM_CLASSES, 1, 4)
    recipe = build_recipe(cfg, student, TEACHER_DIM)
    g = torch.Generator().manual_seed(1)
    train = ImageSet(torch.rand(8, 1, 4, 4, generator=g), torch.tensor(labels))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.01, weight_decay=0.0, seed=0, progress=False)
    result = fit(recipe, train, None, settings, tmp_path, "fp", torch.randn(8, TEACHER_DIM, generator=g),
                 log=lambda line: None)
    assert ("kl" in result.history[0]) is has_kl


def test_rd_learning_rates_reach_the_optimizer_in_fit(tmp_path):
    """One AdamW step moves each parameter by about its group's lr (Adam's first step is
    lr * g / (|g| + eps)): R by 3x, the head by 0.5x the configured rate."""
    recipe = _tiny_rd(reprogram_lr_scale=3.0, head_lr_scale=0.5)
    before = {name: p.detach().clone() for name, p in recipe.named_parameters()}
    g = torch.Generator().manual_seed(1)
    train = ImageSet(torch.rand(8, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, UNLABELLED, UNLABELLED]))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.01, weight_decay=0.0, seed=0, progress=False)
    fit(recipe, train, None, settings, tmp_path, "fp", torch.randn(8, TEACHER_DIM, generator=g),
        log=lambda line: None)
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in recipe.named_parameters()}
    for name, step in moved.items():
        lr = 0.03 if name.startswith("reprogram.") else 0.005 if name.startswith("student.head.") else 0.01
        assert step == pytest.approx(lr, rel=1e-3), name
