"""LoRKD task experts (toolchain/models/experts.py): routed expert layers against per-sample
merged weights, fusion against PEFT's merge_and_unload, per-task BatchNorm against
BatchNorm on each task's images alone, layer choice and rank limits, the Triton op
registration (opcheck, torch.compile) and fused students against the expert student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from medkd.toolchain.errors import ConfigError
from medkd.toolchain.models.experts import (
    ExpertConv2d,
    ExpertLinear,
    ExpertStudent,
    TaskBatchNorm2d,
    select_expert_layers,
)
from medkd.toolchain.models.students import Student, build_student

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_experts(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero B (fresh experts have B = 0 and would hide routing mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (ExpertLinear, ExpertConv2d)):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)


def tiny_student(num_classes: int = 5, in_chans: int = 2) -> Student:
    """A 3x3 conv, a strided 1x1 conv with bias, timm's BatchNormAct2d, a Linear."""
    backbone = nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, stride=2), BatchNormAct2d(6, act_layer=nn.ReLU),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise: never an expert
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 7),
    )
    return Student("tiny", "tiny", backbone, 7, num_classes, in_chans, 8)


def merged_conv_output(layer: ExpertConv2d, x, ids):
    """Each sample through its own task's W0 + s B_t A_t: what routing must equal."""
    return torch.cat([F.conv2d(x[i : i + 1], layer.weight + layer.delta(int(ids[i])), layer.bias, layer.stride,
                               layer.padding, layer.dilation) for i in range(len(x))])


# --------------------------------------------------------------------------- expert layers


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 0), (1, 2, 0), (1, 1, 0), (1, 1, 1)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_routes_each_sample_to_its_own_expert(kernel, stride, padding, backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    layer = ExpertConv2d(nn.Conv2d(5, 7, kernel, stride, padding), num_tasks=3, rank=2, scale=1.5)
    random_experts(layer)
    x = torch.randn(6, 5, 9, 9)
    ids = torch.tensor([2, 0, 1, 1, 2, 0])
    y = layer(x, ids, backend=backend)
    assert (y - merged_conv_output(layer, x, ids)).abs().max() <= TOL
    assert (y - merged_conv_output(layer, x, (ids + 1) % 3)).abs().max() > 1e-2  # experts differ


def test_linear_on_tokens_routes_by_image():
    torch.manual_seed(0)
    layer = ExpertLinear.from_linear(nn.Linear(6, 4), num_tasks=2, rank=2, scale=2.0, freeze_base=False)
    random_experts(layer)
    x = torch.randn(3, 5, 6)  # 3 images x 5 tokens
    ids = torch.tensor([1, 0, 1])
    y = layer(x, ids)
    for i in range(3):
        assert (y[i] - layer.fuse(int(ids[i]))(x[i])).abs().max() <= TOL
    assert layer.weight.requires_grad  # W0 is shared and trained in LoRKD


def test_layer_without_task_ids_says_how_to_call_it():
    layer = ExpertConv2d(nn.Conv2d(2, 3, 3), num_tasks=2, rank=1, scale=1.0)
    with pytest.raises(RuntimeError, match="task_ids"):
        layer(torch.randn(1, 2, 5, 5))


# --------------------------------------------------------------------------- PEFT reference


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)


def test_fusion_matches_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    rank, alpha, T = 2, 16, 3
    plain = _Plain()
    experts = {
        "conv3": ExpertConv2d(plain.conv3, T, rank, alpha / rank),
        "conv1": ExpertConv2d(plain.conv1, T, rank, alpha / rank),
        "fc": ExpertLinear.from_linear(plain.fc, T, rank, alpha / rank, freeze_base=False),
    }
    for layer in experts.values():
        random_experts(layer)
    for task in range(T):
        reference = _Plain()
        reference.load_state_dict(plain.state_dict())
        peft_model = get_peft_model(reference, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(experts)))
        with torch.no_grad():
            for name, layer in experts.items():
                wrapped = getattr(peft_model.base_model.model, name)
                a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
                a.copy_(layer.lora_A[task].view_as(a))
                b.copy_(layer.lora_B[task].view_as(b))
                assert a.abs().min() > 0 and b.abs().min() > 0  # random non-zero A and B
        merged = peft_model.merge_and_unload()
        for name, layer in experts.items():
            fused, ref = layer.fuse(task), getattr(merged, name)
            assert type(fused) is type(ref)
            assert (fused.weight - ref.weight).abs().max() <= 1e-6, (task, name)
            assert torch.equal(fused.bias, ref.bias)
            assert (fused.weight - layer.weight).abs().max() > 1e-3  # the merge did something


# --------------------------------------------------------------------------- per-task BatchNorm


def test_task_batchnorm_normalises_each_task_on_its_own():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    layer = TaskBatchNorm2d(bn, num_tasks=3)
    x = torch.randn(7, 4, 3, 3)
    x[:, :, 0] += 5 * torch.arange(7.0)[:, None, None]  # tasks with very different statistics
    ids = torch.tensor([0, 2, 0, 0, 2, 2, 0])  # task 1 is absent
    y = layer(x, ids)
    for t in (0, 2):
        reference = nn.BatchNorm2d(4, momentum=0.3)
        reference.load_state_dict(bn.state_dict())
        expected = reference(x[ids == t])
        assert (y[ids == t] - expected).abs().max() <= TOL
        assert torch.allclose(layer.running_mean[t], reference.running_mean, atol=1e-6)
        assert torch.allclose(layer.running_var[t], reference.running_var, atol=1e-6)
        assert layer.num_batches_tracked[t] == 1
    assert torch.equal(layer.running_mean[1], torch.zeros(4)) and torch.equal(layer.running_var[1], torch.ones(4))
    assert layer.num_batches_tracked[1] == 0

    layer.eval()
    y_eval = layer(x, ids)
    for t in (0, 2):
        fused = layer.fuse(t).eval()
        assert type(fused) is nn.BatchNorm2d
        assert (y_eval[ids == t] - fused(x[ids == t])).abs().max() <= TOL


def test_task_batchnorm_keeps_timm_activation():
    bn = BatchNormAct2d(3, act_layer=nn.ReLU)
    layer = TaskBatchNorm2d(bn, num_tasks=2)
    y = layer(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))
    assert y.min() == 0  # ReLU applied
    assert type(layer.fuse(1)) is BatchNormAct2d


# --------------------------------------------------------------------------- choosing layers, ranks


def test_expert_layer_choice():
    backbone = tiny_student().backbone  # 0: conv3x3, 3: conv1x1, 5: depthwise, 8: linear
    assert select_expert_layers(backbone, "all") == ["0", "3", "8"]
    assert select_expert_layers(backbone, "1x1-and-linear") == ["3", "8"]
    assert select_expert_layers(backbone, "8") == ["8"]
    assert select_expert_layers(backbone, ["0", "[38]"]) == ["0", "3", "8"]
    with pytest.raises(ConfigError, match="selects no") as info:
        select_expert_layers(backbone, "layer9.*")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="expert_layers must be"):
        select_expert_layers(backbone, 3)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_non_positive_or_odd_rank_is_one_line(rank):
    with pytest.raises(ConfigError, match="recipe.rank must be a positive integer") as info:
        ExpertStudent(tiny_student(), [2, 3], rank, 16)
    assert "\n" not in str(info.value)


def test_rank_above_a_layer_names_the_layer():
    # Layer "3" is a 1x1 conv 8 -> 6: its rank is at most 6 (the 3x3 conv allows 2*9=18).
    assert ExpertStudent(tiny_student(), [2, 3], 6, 16)
    with pytest.raises(ConfigError, match=r"recipe.rank=7 is too large for layer '3'.*at most 6") as info:
        ExpertStudent(tiny_student(), [2, 3], 7, 16)
    assert "\n" not in str(info.value)
    # Leaving that layer out makes rank 7 valid.
    assert ExpertStudent(tiny_student(), [2, 3], 7, 16, expert_layers="0").expert_layers == ["0"]


# --------------------------------------------------------------------------- custom ops, compile


def test_custom_ops_pass_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, T, r = 13, 10, 9, 3, 2
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    ids = torch.randint(0, T, (n,), generator=g)
    w = torch.randn(d_out, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, generator=g, requires_grad=True)
    a = torch.randn(T, r, d_in, generator=g, requires_grad=True)
    bb = torch.randn(T, d_out, r, generator=g, requires_grad=True)
    fwd = torch.ops.medkd.lowrank_expert_linear_fwd.default
    for bias in (b, None):
        result = torch.library.opcheck(fwd, (x, ids, w, bias, a, bb, 0.5, True))
        assert set(result.values()) == {"SUCCESS"}, result
    # Inference form (no xa kept): inputs without grad; with grad its backward refuses.
    frozen = [t.detach() for t in (x, w, b, a, bb)]
    result = torch.library.opcheck(fwd, (frozen[0], ids, frozen[1], frozen[2], frozen[3], frozen[4], 0.5, False))
    assert set(result.values()) == {"SUCCESS"}, result
    with pytest.raises(RuntimeError, match="store_xa=False"):
        fwd(x, ids, w, b, a, bb, 0.5, False)[0].sum().backward()
    y, xa, order, offsets = fwd(x, ids, w, b, a, bb, 0.5, True)
    dy = torch.randn(n, d_out, generator=g)
    bwd = torch.ops.medkd.lowrank_expert_linear_bwd.default
    for needs in ((True, True, True), (False, True, False)):
        result = torch.library.opcheck(bwd, (dy, x.detach(), order, offsets, w.detach(), a.detach(), bb.detach(),
                                             xa.detach(), 0.5, *needs))
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_expert_layer_compiles_in_one_graph(kind, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the 1x1/linear path runs the Triton op
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "linear":
        layer = ExpertLinear.from_linear(nn.Linear(12, 10), 3, 2, 2.0, freeze_base=False)
        x = torch.randn(9, 12)
    else:
        k = 1 if kind == "conv1x1" else 3
        layer = ExpertConv2d(nn.Conv2d(6, 5, k, padding=k // 2), 3, 2, 2.0)
        x = torch.randn(4, 6, 5, 5)
    random_experts(layer)
    ids = torch.tensor([0, 2, 1, 2, 0, 1, 1, 0, 2][: len(x)])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, ids)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.weight, layer.lora_A, layer.lora_B)]
    layer.zero_grad()
    y_eager = layer(x, ids)
    y_eager.square().sum().backward()
    assert (y - y_eager).abs().max() <= TOL
    for got, p in zip(grads, (layer.weight, layer.lora_A, layer.lora_B)):
        assert (got - p.grad).abs().max() <= 1e-4 * p.grad.abs().max()


# --------------------------------------------------------------------------- the student


def _fused_matches(model: ExpertStudent, x, ids):
    model.eval()
    with torch.no_grad():
        routed = model.task_logits(x, ids)
        for t, start in enumerate(model.task_offsets):
            fused = model.fuse(t)
            assert type(fused) is Student and fused.head.out_features == model.num_classes[t]
            assert not any(isinstance(m, (ExpertConv2d, ExpertLinear, TaskBatchNorm2d)) for m in fused.modules())
            mine = ids == t
            out = fused(x[mine])
            assert (out - routed[mine, start : start + model.num_classes[t]]).abs().max() <= TOL, t


def test_tiny_student_fuses_to_the_expert_model_per_task():
    torch.manual_seed(0)
    model = ExpertStudent(tiny_student(), [2, 3, 4], rank=2, lora_alpha=16)
    random_experts(model)
    x = torch.rand(9, 2, 8, 8)
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    model.train()
    for _ in range(3):  # give each task its own running statistics
        model.task_logits(x + ids[:, None, None, None].float(), ids)
    _fused_matches(model, x, ids)
    logits = model(x, ids)  # global logits: -inf outside the sample's task
    for i, t in enumerate(ids.tolist()):
        start, k = model.task_offsets[t], model.num_classes[t]
        assert torch.isfinite(logits[i, start : start + k]).all()
        assert torch.isinf(logits[i]).sum() == sum(model.num_classes) - k


def test_fresh_expert_student_computes_the_student():
    torch.manual_seed(0)
    student = tiny_student(num_classes=5).eval()
    x = torch.rand(4, 2, 8, 8)
    expected = student(x)
    model = ExpertStudent(student, [2, 3], rank=2, lora_alpha=16).eval()  # B = 0, heads from the head rows
    ids = torch.tensor([0, 1, 1, 0])
    assert (model.task_logits(x, ids) - expected).abs().max() <= TOL


@pytest.mark.parametrize("name,size", [("mobilenetv3", 32), ("vit_tiny", 16)])
def test_real_students_fuse_per_task(name, size):
    torch.manual_seed(0)
    model = ExpertStudent(build_student({"name": name}, 7, 1, size), [3, 4], rank=4, lora_alpha=16)
    random_experts(model, std=0.05)
    assert len(model.expert_layers) > 10
    x = torch.rand(4, 1, size, size)
    ids = torch.tensor([1, 0, 0, 1])
    model.train()
    with torch.no_grad():
        model.task_logits(x, ids)
    _fused_matches(model, x, ids)
    counts = model.parameter_counts()
    assert counts["stored"] == counts["shared"] + counts["experts"] + sum(counts["heads"])
    assert counts["deployed"][0] == sum(p.numel() for p in model.fuse(0).parameters())
