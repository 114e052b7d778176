"""recipe=lora: LiteMedSAM fine-tuned with PEFT LoRA on its last stage and neck plus a head."""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medkd.recipes import UNLABELLED, Batch, build_recipe
from medkd.toolchain.config import load_config
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.models.students import count_parameters
from medkd.toolchain.models.teachers import LITEMEDSAM_ENCODER_KWARGS, build_teacher

SIZE = 16  # teacher input size = image size: no resize, the smallest TinyViT the tests can run
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def teacher():
    return build_teacher({"name": "litemedsam", "input_size": SIZE})


def _lora(teacher, image_size=SIZE, **overrides):
    cfg = OmegaConf.merge(load_config(["recipe=lora"]).recipe, overrides)
    student = SimpleNamespace(num_classes=NUM_CLASSES, image_size=image_size)  # lora reads only these
    return build_recipe(cfg, student, teacher.feature_dim, teacher=teacher)


def _images(n, seed=0):
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_cached_input_of_the_last_stage_reproduces_the_teachers_own_features(teacher):
    recipe = _lora(teacher).eval()
    extractor = recipe.feature_extractor(teacher)
    assert extractor.fingerprint != teacher.fingerprint  # its own cache entries
    assert teacher.fingerprint in extractor.fingerprint  # and new ones when the teacher changes
    channels = LITEMEDSAM_ENCODER_KWARGS["embed_dims"][-1]
    assert extractor.feature_dim == (SIZE // 4) ** 2 * channels
    images = _images(5)
    with torch.no_grad():
        cached = extractor(images)
        assert cached.shape == (5, extractor.feature_dim) and cached.dtype == torch.float32
        # Fresh adapters (PEFT initialises B = 0): the trainable part on the cached tokens is
        # exactly the frozen teacher's pooled feature.
        torch.testing.assert_close(recipe.student.late(cached), teacher(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(recipe.student(images), recipe.student.head(teacher(images)), rtol=0, atol=1e-5)


def test_loss_is_the_mean_cross_entropy_of_the_labelled_rows(teacher):
    recipe = _lora(teacher).eval()  # eval: no adapter dropout, so logits are reproducible
    features = recipe.feature_extractor(teacher)(_images(4)).detach()
    labels = torch.tensor([0, UNLABELLED, 2, 1])
    with torch.no_grad():
        logits = recipe.student.from_intermediate(features).tolist()
        loss, parts = recipe.loss(Batch(_images(4), labels, features))
    terms = []
    for row, label in zip(logits, labels.tolist()):
        if label != UNLABELLED:
            terms.append(math.log(sum(math.exp(v) for v in row)) - row[label])
    expected = sum(terms) / 3  # three labelled rows, not four
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert not parts["ce"].requires_grad
    # The unlabelled row contributes nothing (lora does not learn from withheld labels).
    changed = features.clone()
    changed[1] += 1.0
    assert recipe.loss(Batch(_images(4), labels, changed))[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert not recipe.uses_unlabelled


def test_only_the_adapters_and_the_head_train(teacher):
    recipe = _lora(teacher)
    trainable = {n for n, p in recipe.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("student.head.") for n in trainable)
    groups = recipe.parameter_groups(0.01)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in recipe.parameters() if p.requires_grad}

    before = copy.deepcopy(recipe.state_dict())
    features = recipe.feature_extractor(teacher)(_images(8)).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    recipe.train()
    assert not any(m.training for m in recipe.student.early.modules())  # frozen part stays in eval
    assert not any(m.training for m in recipe.student.late.modules() if isinstance(m, _BatchNorm))
    assert any(m.training for n, m in recipe.student.late.named_modules() if "lora_dropout" in n)
    for _ in range(3):
        optimizer.zero_grad()
        recipe.loss(Batch(_images(8), labels, features))[0].backward()
        optimizer.step()
    after = recipe.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert {"student.head.weight", "student.head.bias"} <= changed
    # Nothing else moved: base weights of the copied stage and neck, the early stages, BN statistics.
    assert all("lora_" in k or k.startswith("student.head.") for k in changed), sorted(changed)[:5]


def test_merged_model_matches_the_unmerged_one_with_nonzero_adapters(teacher):
    model = _lora(teacher).student.eval()
    images = _images(6, seed=1)
    with torch.no_grad():
        fresh = model(images)
        generator = torch.Generator().manual_seed(3)
        for name, p in model.late.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        adapted = model(images)
        merged = copy.deepcopy(model).merge_and_unload().eval()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert (adapted - fresh).abs().max() > 1e-3  # the adapters do change the model
        torch.testing.assert_close(merged(images), adapted, rtol=0, atol=1e-5)
    counts = model.parameter_counts()
    assert counts["total"] == count_parameters(merged)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] == counts["lora"] + counts["head"] and counts["head"] == 256 * NUM_CLASSES + NUM_CLASSES


class _OtherTeacher(nn.Module):
    name = "efficientnet-lite0"
    feature_dim = 1280
    input_size = 224


@pytest.mark.parametrize("make, message", [
    (lambda t: _lora(_OtherTeacher()), "teacher=litemedsam only, not teacher=efficientnet-lite0"),
    (lambda t: _lora(t, target_modules=["no_such_layer"]), "recipe.target_modules=['no_such_layer'] matches no layer"),
    (lambda t: _lora(t, rank=0), "recipe.rank must be a positive integer"),
    (lambda t: _lora(t, lora_dropout=1.0), "recipe.lora_dropout must be a number in [0, 1)"),
    (lambda t: _lora(t, head_lr_scale=float("nan")), "recipe.head_lr_scale must be a number > 0"),
    (lambda t: _lora(t, image_size=SIZE * 2), f"use teacher.input_size >= {SIZE * 2}"),
])
def test_mistakes_are_one_line_config_errors(teacher, make, message):
    with pytest.raises(ConfigError) as error:
        make(teacher)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_lora_build_exports_an_onnx_that_matches_the_fine_tuned_model(tmp_path):
    import onnxruntime as ort

    from medkd.toolchain.data import load_task
    from medkd.toolchain.export_cli import trained_deployables, with_current_defaults
    from medkd.toolchain.pipeline import run

    run_dir = tmp_path / "run"
    report = run(load_config([
        "recipe=lora", "teacher.input_size=32", "data.augment=none", "data.max_train=48", "data.max_test=16",
        "train.epochs=1", "train.batch_size=16", "threads=1", "export.precision=fp32",
        "export.validation_images=16", "export.latency_runs=2", "export.latency_warmup=1",
        "export.latency_batches=[1]", "export.latency_threads=[1]", "progress=false",
        f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]))
    model = report["export"]["models"]["model"]
    assert model["deployed_file"] == "model.onnx"
    assert model["formats"]["onnx"]["fold"]["peft_merge"]["merged"] is True
    assert report["training"]["teacher_test_accuracy"] is None  # no separate teacher branch

    # Rebuilt from the run directory the way medkd-export does (teacher module + student.safetensors).
    cfg = with_current_defaults(OmegaConf.load(run_dir / "config.yaml"))
    task = load_task(cfg.data)
    rebuilt = trained_deployables(cfg, task, run_dir)["model"]
    images = task.test.images
    with torch.no_grad():
        expected = rebuilt(images).numpy()
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert np.abs(logits - expected).max() <= 1e-4
    assert (expected.argmax(1) == task.test.labels.numpy()).mean() == pytest.approx(report["training"]["test_accuracy"])

    # The report describes the fine-tuned foundation model, not the unused student=.
    parameters = json.loads((run_dir / "report.json").read_text())["student"]["parameters"]
    merged = copy.deepcopy(rebuilt).merge_and_unload()
    assert parameters["total"] == count_parameters(merged)
    assert parameters["trainable"] == sum(p.numel() for n, p in rebuilt.named_parameters()
                                          if "lora_" in n or n.startswith("head."))
    md = (run_dir / "report.md").read_text()
    assert "litemedsam (32px) + LoRA r=8" in md and f"{parameters['trainable']:,} trained" in md
