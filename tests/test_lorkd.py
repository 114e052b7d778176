"""recipe=lorkd: multi-task data only, the per-task loss against hand-computed values, exact
gradient separation in a mixed-task batch, one training step through the Triton kernel
(TRITON_INTERPRET=1) against the PyTorch reference, and a short fit on data=multitask with
task-routed evaluation and one fused deployable per task."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from medkd.kernels._dispatch import backends_run, reset_backends_run
from medkd.recipes import UNLABELLED, Batch, build_recipe
from medkd.toolchain.config import load_config
from medkd.toolchain.data import ct, fashion_mnist, load_task
from medkd.toolchain.data.base import ImageSet, TaskInfo
from medkd.toolchain.data.mri_volume import DEFAULT_DIR as MRI_DIR
from medkd.toolchain.errors import ConfigError, UserError
from medkd.toolchain.export_stage import training_pool
from medkd.toolchain.models.experts import ExpertConv2d, ExpertLinear, TaskBatchNorm2d
from medkd.toolchain.models.students import Student, build_student
from medkd.toolchain.train import TrainSettings, fit, predict, teacher_branch_accuracy

TEACHER_DIM = 6
TASKS = [TaskInfo("a", ("a0", "a1"), 0), TaskInfo("b", ("b0", "b1", "b2"), 2), TaskInfo("c", ("c0", "c1"), 5)]
CFG = {"name": "lorkd", "needs_teacher": True, "rank": 2, "lora_alpha": 16, "expert_layers": "all",
       "kd_weight": 0.5, "temperature": 2.0, "probe_epochs": 20, "probe_lr": 0.05}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_student(num_classes: int = 7) -> Student:
    """3x3 conv + BatchNorm, strided 1x1 conv + BatchNorm, Linear: every kind of expert layer.
    (No conv bias before BatchNorm: its gradient is zero up to rounding, untestable.)"""
    backbone = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1, stride=2, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4), nn.ReLU(),
    )
    return Student("tiny", "tiny", backbone, 4, num_classes, 1, 8)


def lorkd(student=None, tasks=TASKS, **overrides):
    return build_recipe(OmegaConf.create({**CFG, **overrides}), student or tiny_student(), TEACHER_DIM, tasks)


def random_experts(model: nn.Module, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (ExpertLinear, ExpertConv2d)):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)


def mixed_batch(n: int = 14, seed: int = 0) -> Batch:
    """Tasks a, b, c mixed; every task has labelled and unlabelled rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % 3
    local = torch.randint(0, 10, (n,), generator=g) % torch.tensor([2, 3, 2])[ids]
    labels = torch.tensor([0, 2, 5])[ids] + local
    labels[[3, 4, 8]] = UNLABELLED
    images = torch.rand(n, 1, 8, 8, generator=g) + ids[:, None, None, None] * 0.5
    return Batch(images, labels, torch.randn(n, TEACHER_DIM, generator=g), ids)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- refusals


def test_lorkd_needs_multitask_data(tmp_path):
    with pytest.raises(ConfigError) as info:
        lorkd(tasks=None)
    assert "data=multitask" in one_line(info)

    recipe = lorkd()
    single = ImageSet(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1]))  # no task ids
    settings = TrainSettings(epochs=1, batch_size=6, lr=1e-3, weight_decay=0.0, seed=0, progress=False)
    with pytest.raises(UserError) as info:
        fit(recipe, single, None, settings, tmp_path, "x", torch.randn(6, TEACHER_DIM))
    assert "data=multitask" in one_line(info)
    assert not list(tmp_path.iterdir())  # refused before anything was written

    batch = mixed_batch()
    with pytest.raises(UserError):
        recipe.loss(Batch(batch.images, batch.labels, batch.teacher_features))


@pytest.mark.parametrize("key,value,fragment", [
    ("rank", 0, "recipe.rank must be a positive integer"),
    ("rank", 6, "recipe.rank=6 is too large for layer '3'"),  # the 1x1 conv 6 -> 5
    ("lora_alpha", -1, "recipe.lora_alpha must be a positive number"),
    ("kd_weight", -0.5, "recipe.kd_weight must be a number >= 0"),
    ("temperature", 0, "recipe.temperature must be a number > 0"),
    ("expert_layers", "head.*", "selects no Conv2d/Linear layer"),
])
def test_bad_settings_are_one_line(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        lorkd(**{key: value})
    assert fragment in one_line(info)


def test_config_composes_into_the_recipe():
    cfg = load_config(["recipe=lorkd", "data=multitask"])
    assert cfg.recipe.rank == 4 and cfg.recipe.lora_alpha == 16 and cfg.recipe.expert_layers == "all"
    recipe = build_recipe(cfg.recipe, tiny_student(), TEACHER_DIM, TASKS)
    assert recipe.needs_task_ids and recipe.uses_unlabelled and recipe.needs_teacher
    assert recipe.student.scale == 4.0  # lora_alpha / rank


# --------------------------------------------------------------------------- the loss by hand


def test_loss_is_the_sum_of_per_task_means_by_hand(monkeypatch):
    # Student logits all 0. Teacher probes: weight 0, bias [ln 3, 0] for task a, 0 otherwise.
    # Rows: 0 task a labelled (local 1), 1 task a unlabelled, 2 task b labelled (local 0).
    # Task c is absent. Temperature 2, kd_weight 0.5.
    recipe = lorkd()
    images = torch.rand(3, 1, 8, 8)
    student_logits = torch.zeros(3, 7, requires_grad=True)
    monkeypatch.setattr(recipe.student, "task_logits", lambda images, ids: student_logits)
    with torch.no_grad():
        for head in recipe.teacher_heads:
            head.weight.zero_()
            head.bias.zero_()
        recipe.teacher_heads[0].bias[0] = math.log(3)
    batch = Batch(images, torch.tensor([1, UNLABELLED, 2]), torch.randn(3, TEACHER_DIM), torch.tensor([0, 0, 1]))

    t = 2.0
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]  # softmax([ln 3, 0] / 2)
    kl_row_a = sum(pi * math.log(pi / 0.5) for pi in p) * t * t  # both task-a rows, labelled or not
    ce_a, ce_b = math.log(2), math.log(3)  # the labelled rows' own-task CE at zero logits
    expected_kl, expected_ce = kl_row_a + 0.0, ce_a + ce_b
    loss, parts = recipe.loss(batch)
    assert loss.item() == pytest.approx(expected_ce + 0.5 * expected_kl, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert parts["kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    assert not parts["ce"].requires_grad and not parts["kl"].requires_grad
    terms = recipe.task_terms(batch)
    assert [c.item() for c, _ in terms][2] == 0 and [k.item() for _, k in terms][2] == 0  # absent task c

    loss.backward()
    grad = student_logits.grad
    assert torch.equal(grad[:, 5:], torch.zeros(3, 2))  # task c's head columns: nothing
    assert torch.equal(grad[2, :2], torch.zeros(2)) and torch.equal(grad[:2, 2:], torch.zeros(2, 5))


# --------------------------------------------------------------------------- gradient separation


def assert_close(actual, expected, rel=1e-5, scale=None):
    """Max abs difference within rel of `scale` (default: the expected tensor's largest entry);
    summation order differs between a sum of terms and its parts."""
    scale = expected.abs().max() if scale is None else scale
    assert (actual - expected).abs().max() <= rel * max(float(scale), 1e-12)


def _grads(output, params):
    return torch.autograd.grad(output, params, retain_graph=True, allow_unused=True)


def prepared_recipe():
    """A training-mode lorkd recipe with non-zero experts and fitted probes, and a mixed batch."""
    torch.manual_seed(0)
    recipe = lorkd()
    recipe.train()
    random_experts(recipe.student)
    batch = mixed_batch()
    recipe.prepare(batch.teacher_features, batch.labels)
    return recipe, batch


def test_gradient_separation_is_exact_in_a_mixed_batch():
    recipe, batch = prepared_recipe()
    experts = [m for _, m in recipe.student.modules_with_experts()]
    assert len(experts) == 3
    per_task = [p for m in experts for p in (m.lora_A, m.lora_B)]  # index 0 = task
    heads = list(recipe.student.heads.parameters())
    shared = [p for n, p in recipe.student.named_parameters() if "lora_" not in n and not n.startswith("heads.")]

    terms = [ce + recipe.kd_weight * kl for ce, kl in recipe.task_terms(batch)]
    params = per_task + heads + shared
    full = _grads(torch.stack(terms).sum(), params)
    alone = [_grads(term, params) for term in terms]
    for t in range(3):
        for i, p in enumerate(per_task):
            assert alone[t][i] is not None
            assert_close(full[i][t], alone[t][i][t])
            for s in range(3):
                if s != t:  # task s's term leaves expert t exactly untouched
                    assert torch.equal(alone[s][i][t], torch.zeros_like(alone[s][i][t]))
        assert full[0][t].abs().max() > 0  # every expert learns
    # The shared backbone gets the sum, compared on the scale of the largest shared gradient
    # (some entries are near zero, where relative rounding differences mean nothing).
    offset = len(per_task) + len(heads)
    scale = max(g.abs().max() for g in full[offset:])
    for i, p in enumerate(shared):
        summed = sum(alone[t][offset + i] for t in range(3))
        assert_close(full[offset + i], summed, scale=scale)


def _sub_batch(batch: Batch, t: int) -> Batch:
    mine = batch.task_ids == t
    return Batch(batch.images[mine], batch.labels[mine], batch.teacher_features[mine], batch.task_ids[mine])


def test_each_task_term_is_what_that_task_alone_would_give():
    """Per-task BatchNorm: task t's term (and expert t's gradient) in the mixed batch equal those
    of a batch of task t's images alone; with ordinary BatchNorm they do not (control)."""
    recipe, batch = prepared_recipe()

    def term_and_expert_grad(r, b, t):
        ce, kl = r.task_terms(b)[t]
        term = ce + r.kd_weight * kl
        first = next(m for _, m in r.student.modules_with_experts())
        return term.detach(), torch.autograd.grad(term, first.lora_A)[0][t]

    for t in range(3):
        mixed_term, mixed_grad = term_and_expert_grad(recipe, batch, t)
        alone_term, alone_grad = term_and_expert_grad(recipe, _sub_batch(batch, t), t)
        assert_close(mixed_term, alone_term)
        assert_close(mixed_grad, alone_grad, rel=1e-4)
        assert mixed_grad.abs().max() > 0

    control = copy.deepcopy(recipe)  # ordinary BatchNorm: batch statistics over all tasks
    for name, module in list(control.student.backbone.named_modules()):
        if isinstance(module, TaskBatchNorm2d):
            setattr(control.student.backbone, name, module.fuse(0).train())
    mixed_term, _ = term_and_expert_grad(control, batch, 0)
    alone_term, _ = term_and_expert_grad(control, _sub_batch(batch, 0), 0)
    assert (mixed_term - alone_term).abs() > 1e-3


# --------------------------------------------------------------------------- Triton path


def test_one_training_step_through_the_triton_kernel(tmp_path, monkeypatch):
    torch.manual_seed(0)
    recipe = lorkd()
    random_experts(recipe.student)
    batch = mixed_batch()
    recipe.prepare(batch.teacher_features, batch.labels)
    reference = copy.deepcopy(recipe)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reset_backends_run()
    ref_loss, _ = reference.loss(batch)
    ref_loss.backward()
    assert backends_run()["lowrank_expert_linear"] == "torch"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reset_backends_run()
    loss, _ = recipe.loss(batch)
    loss.backward()
    assert backends_run()["lowrank_expert_linear"] == "triton"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(recipe.named_parameters(), reference.parameters()):
        if p.requires_grad:
            scale = q.grad.abs().max().clamp_min(1e-6)
            assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name

    # ... and the shared loop's step (AdamW) on it: fit logs which backend ran.
    images = ImageSet(batch.images, batch.labels, batch.task_ids)
    before = copy.deepcopy(recipe.state_dict())
    settings = TrainSettings(epochs=1, batch_size=len(images), lr=1e-2, weight_decay=0.0, seed=0, progress=False)
    result = fit(recipe, images, None, settings, tmp_path, "fp", batch.teacher_features, log=lambda line: None)
    assert result.kernel_backends == {"lowrank_expert_linear": "triton"}
    after = recipe.state_dict()
    assert not torch.equal(before["student.heads.0.weight"], after["student.heads.0.weight"])
    assert not torch.equal(before["student.backbone.8.lora_A"], after["student.backbone.8.lora_A"])


# --------------------------------------------------------------------------- fit on data=multitask


needs_builtins = pytest.mark.skipif(
    not ((MRI_DIR / "ch2.nii.gz").is_file() and ct.DEFAULT_PATH.is_file()
         and (fashion_mnist.DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file()),
    reason="needs the Debian data packages mricron-data, invesalius-examples, dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def multitask():
    return load_task({"name": "multitask", "tasks": ["mri", "ct", "fashion-mnist"], "max_train": 24,
                      "max_test": 12, "image_size": 16, "train_fraction": 0.5})


def _features(images: torch.Tensor) -> torch.Tensor:
    """A stand-in teacher: 4x4 average-pooled pixels (informative, and fast)."""
    return F.adaptive_avg_pool2d(images, 4).flatten(1)[:, :16]


@needs_builtins
def test_short_fit_on_multitask_data_and_one_fused_model_per_task(multitask, tmp_path):
    task = multitask
    torch.manual_seed(0)
    student = build_student({"name": "mobilenetv3"}, task.num_classes, task.in_chans, task.image_size)
    recipe = build_recipe(OmegaConf.create({**CFG, "rank": 4}), student, 16, task.tasks)
    train = training_pool(task)  # labelled + withheld-label images, all with task ids
    assert (train.labels == UNLABELLED).any()
    settings = TrainSettings(epochs=2, batch_size=16, lr=2e-3, weight_decay=0.0, seed=0, progress=False)
    val = task.test
    result = fit(recipe, train, val, settings, tmp_path, "fp", _features(train.images), _features(val.images),
                 log=lambda line: None)
    assert set(result.history[-1]) == {"epoch", "loss", "ce", "kl", "val_accuracy", "teacher_val_accuracy"}

    # Task-routed accuracy, as the loop measured it: argmax stays inside each image's task.
    model = recipe.evaluation_model()
    logits = predict(model, val.images, task_ids=val.task_ids)
    routed = logits.argmax(1)
    offsets = torch.tensor([t.offset for t in task.tasks])
    sizes = torch.tensor([t.num_classes for t in task.tasks])
    assert ((routed >= offsets[val.task_ids]) & (routed < (offsets + sizes)[val.task_ids])).all()
    assert result.history[-1]["val_accuracy"] == pytest.approx((routed == val.labels).float().mean().item())
    teacher = recipe.teacher_logits(_features(val.images), val.task_ids).argmax(1)
    assert result.history[-1]["teacher_val_accuracy"] == pytest.approx(
        teacher_branch_accuracy(recipe, _features(val.images), val.labels, task_ids=val.task_ids))
    assert teacher_branch_accuracy(recipe, _features(val.images), val.labels) is None  # no ids, no routing
    assert (teacher == val.labels).float().mean().item() == pytest.approx(result.history[-1]["teacher_val_accuracy"])

    # deployables(): {task name: fused plain Student}, task-local outputs equal to the expert model's.
    deployables = recipe.deployables()
    assert list(deployables) == ["mri", "ct", "fashion-mnist"]
    for t, (name, fused) in enumerate(deployables.items()):
        info = task.tasks[t]
        assert type(fused) is Student and fused.head.out_features == info.num_classes
        mine = val.task_ids == t
        local = predict(fused, val.images[mine])
        expected = logits[mine][:, info.offset : info.offset + info.num_classes]
        assert (local - expected).abs().max() <= 1e-5, name
        assert torch.equal(local.argmax(1) + info.offset, routed[mine])
    first = predict(recipe.deployable(), val.images[:4])
    assert torch.equal(first, predict(deployables["mri"], val.images[:4]))


def test_lorkd_build_exports_one_fused_model_per_task_and_reexports_one(tmp_path):
    """medkd-build recipe=lorkd data=multitask end to end, then medkd-export of one task."""
    import json

    from safetensors.torch import load_file

    from medkd.toolchain.config import load_config
    from medkd.toolchain.export_cli import main as export_main
    from medkd.toolchain.pipeline import run
    from medkd.toolchain.verify_cli import main as verify

    from test_pipeline import SMALL

    run_dir = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith(("export.precision", "export.calibration", "data.augment"))]
    report = run(load_config([*overrides, "recipe=lorkd", "data=multitask", "student=mobilenetv3",
                              "data.max_train=60", "data.max_test=30", "export.calibration.images=16",
                              "export.validation_images=16", f"run_dir={run_dir}",
                              f"cache_dir={tmp_path / 'cache'}"]))
    tasks = ["mri", "ct", "fashion-mnist"]
    assert list(report["export"]["models"]) == tasks
    index = json.loads((run_dir / "deployables.json").read_text())
    assert list(index) == tasks and all((run_dir / index[t]["deployed_file"]).is_file() for t in tasks)
    assert (run_dir / "firmware" / "medkd_fashion_mnist.bin").is_file()
    counts = report["student"]["parameters"]
    assert counts["experts"] > 0 and len(counts["deployed"]) == 3 and max(counts["deployed"]) < counts["stored"]
    assert any("lora_A" in key for key in load_file(str(run_dir / "student.safetensors")))  # every expert kept
    assert "Per task (one fused model each" in (run_dir / "report.md").read_text()

    assert export_main([str(run_dir), "export.task=ct", "export.precision=fp32"]) == 0
    assert list(json.loads((run_dir / "deployables.json").read_text())) == ["ct"]
    assert not (run_dir / "mri.onnx").exists() and (run_dir / "ct.onnx").is_file()
    assert verify([str(run_dir)]) == 0
