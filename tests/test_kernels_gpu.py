"""The fused kernels compiled for and run on a real CUDA GPU (the rest of the kernel tests run
them through triton's CPU interpreter): values and gradients against the PyTorch
references at the shapes recipe=lorkd produces, the custom ops under opcheck and
torch.compile(fullgraph=True) with inductor, and one LoRKD training step through the shared
loop on the GPU, which must log the Triton backend.

Skipped without a CUDA GPU. Run on one with `pytest tests/test_kernels_gpu.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.kernels import (
    LowRankExpertLinear,
    cka_loss,
    cka_loss_reference,
    lowrank_expert_linear,
    lowrank_expert_linear_reference,
    triton_available,
)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA GPU and triton (run on a GPU machine)")

TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (4e-2, 4e-2)}  # (rtol, atol) on max-normalised values


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    # The reference's fp32 matmuls must be fp32 (the kernels' fp32 dots follow this flag too).
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def assert_close_scaled(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = expected.detach().float().abs().max().clamp_min(1e-6)
    err = float(((actual.detach().float() - expected.detach().float()).abs() / scale).max())
    assert err <= max(rtol, atol), f"{what}: max error {err:.2e} of max |ref| (dtype {dtype})"


def lowrank_inputs(n, d_in, d_out, tasks, rank, dtype, base_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype).requires_grad_(grad)

    return (rnd(n, d_in, grad=True), torch.randint(0, tasks, (n,), generator=g, device="cuda"),
            rnd(d_out, d_in, scale=d_in ** -0.5, grad=base_grad), rnd(d_out, scale=0.1, grad=base_grad),
            rnd(tasks, rank, d_in, scale=d_in ** -0.5, grad=True), rnd(tasks, d_out, rank, scale=0.3, grad=True))


# (n, d_in, d_out, tasks, rank): LoRKD's MobileNetV3 shapes (1x1 convs over batch x H x W
# rows, 16..960 channels, rank 4, 3 tasks), odd sizes that cut every tile, and a square one.
SHAPES = [(32768, 16, 72, 3, 4), (8192, 72, 24, 3, 4), (2048, 120, 40, 3, 4), (512, 960, 1280, 3, 4),
          (1001, 37, 53, 5, 3), (4096, 768, 768, 8, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lowrank_values_and_grads_match_reference(shape, dtype):
    inputs = lowrank_inputs(*shape, dtype=dtype, base_grad=shape[0] == 1001)
    wanted = [t for t in inputs if t.requires_grad]
    dy = torch.randn(shape[0], shape[2], device="cuda").to(dtype)
    y = lowrank_expert_linear(*inputs, 0.5, backend="triton")
    grads = torch.autograd.grad(y, wanted, dy)
    y_ref = lowrank_expert_linear_reference(*inputs, 0.5)
    grads_ref = torch.autograd.grad(y_ref, wanted, dy)
    assert_close_scaled(y, y_ref, dtype, "y")
    for name, got, ref in zip(["dx", "dW0", "db", "dA", "dB"] if len(wanted) == 5 else ["dx", "dA", "dB"],
                              grads, grads_ref):
        assert_close_scaled(got, ref, dtype, name)


def test_lowrank_task_without_rows_gets_exactly_zero_grad():
    x, ids, w, b, a, bb = lowrank_inputs(4096, 72, 24, 4, 4, torch.float32)
    ids = ids % 3  # task 3 has no rows
    y = lowrank_expert_linear(x, ids, w, b, a, bb, 0.5, backend="triton")
    da, db = torch.autograd.grad(y.square().sum(), (a, bb))
    assert torch.count_nonzero(da[3]) == 0 and torch.count_nonzero(db[3]) == 0
    assert torch.count_nonzero(da[:3]) > 0 and torch.count_nonzero(db[:3]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4096, 192, 192), (1000, 37, 53), (16384, 576, 256)], ids=str)
def test_cka_values_and_grads_match_reference(shape, dtype):
    n, d1, d2 = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(n, d2, generator=g, device="cuda").to(dtype)
    mix = torch.randn(d2, d1, generator=g, device="cuda") / d2 ** 0.5
    x = (y.float() @ mix + torch.randn(n, d1, generator=g, device="cuda")).to(dtype).requires_grad_()
    loss = cka_loss(x, y, backend="triton")
    (dx,) = torch.autograd.grad(loss, (x,))
    loss_ref = cka_loss_reference(x, y)
    (dx_ref,) = torch.autograd.grad(loss_ref, (x,))
    assert abs(float(loss) - float(loss_ref)) <= (1e-4 if dtype == torch.float32 else 2e-2)
    assert_close_scaled(dx, dx_ref, dtype, "dx")


def test_custom_ops_pass_opcheck_on_cuda():
    x, ids, w, b, a, bb = lowrank_inputs(301, 40, 24, 3, 4, torch.float32, base_grad=True)
    fwd = torch.ops.medkd.lowrank_expert_linear_fwd.default
    result = torch.library.opcheck(fwd, (x, ids, w, b, a, bb, 0.5, True))
    assert set(result.values()) == {"SUCCESS"}, result
    y, xa, order, offsets = fwd(x, ids, w, b, a, bb, 0.5, True)
    bwd = torch.ops.medkd.lowrank_expert_linear_bwd.default
    dy = torch.randn_like(y)
    result = torch.library.opcheck(bwd, (dy, x.detach(), order, offsets, w.detach(), a.detach(), bb.detach(),
                                         xa.detach(), 0.5, True, True, True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_expert_layer_compiles_fullgraph_with_inductor():
    torch.manual_seed(0)
    layer = LowRankExpertLinear(48, 40, num_tasks=3, rank=4).cuda()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(2, 257, 48, device="cuda", requires_grad=True)
    ids = torch.tensor([0, 2], device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, ids)
    (dx,) = torch.autograd.grad(y.square().sum(), (x,))
    y_ref = lowrank_expert_linear_reference(x, ids, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                            layer.scale)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), (x,))
    assert_close_scaled(y, y_ref, torch.float32, "y")
    assert_close_scaled(dx, dx_ref, torch.float32, "dx")


def test_one_lorkd_training_step_on_cuda_runs_the_fused_kernel(tmp_path):
    """recipe=lorkd's loss and the shared loop's step on a CUDA model: the loss and every
    gradient equal the same step on the CPU (PyTorch reference), and fit logs 'triton'."""
    from medkd.kernels._dispatch import backends_run, reset_backends_run
    from medkd.recipes import UNLABELLED, Batch, build_recipe
    from medkd.toolchain.data.base import ImageSet, TaskInfo
    from medkd.toolchain.models.students import Student
    from medkd.toolchain.train import TrainSettings, fit

    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 32), nn.ReLU())
    tasks = [TaskInfo("a", ("a0", "a1"), 0), TaskInfo("b", ("b0", "b1", "b2"), 2)]
    cfg = OmegaConf.create({"name": "lorkd", "needs_teacher": True, "rank": 4, "lora_alpha": 16,
                            "expert_layers": "all", "kd_weight": 0.5, "temperature": 2.0,
                            "probe_epochs": 5, "probe_lr": 0.05})
    recipe = build_recipe(cfg, Student("tiny", "tiny", backbone, 32, 5, 1, 16), 8, tasks)
    g = torch.Generator().manual_seed(0)
    n = 24
    ids = torch.arange(n) % 2
    labels = torch.tensor([0, 2])[ids] + torch.randint(0, 2, (n,), generator=g)
    labels[[1, 6]] = UNLABELLED
    batch = Batch(torch.rand(n, 1, 16, 16, generator=g), labels, torch.randn(n, 8, generator=g), ids)
    recipe.prepare(batch.teacher_features, batch.labels)
    with torch.no_grad():
        for name, p in recipe.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.3, generator=g)
    cpu = copy.deepcopy(recipe)

    reset_backends_run()
    ref_loss, _ = cpu.loss(batch)
    ref_loss.backward()
    assert backends_run()["lowrank_expert_linear"] == "torch"

    recipe.cuda()
    cuda_batch = Batch(*(t.cuda() for t in (batch.images, batch.labels, batch.teacher_features, batch.task_ids)))
    reset_backends_run()
    loss, _ = recipe.loss(cuda_batch)
    loss.backward()
    assert backends_run()["lowrank_expert_linear"] == "triton"
    assert abs(float(loss) - float(ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    for (name, p), q in zip(recipe.named_parameters(), cpu.parameters()):
        if p.requires_grad and q.grad is not None:
            assert_close_scaled(p.grad.cpu(), q.grad, torch.float32, name)

    settings = TrainSettings(epochs=1, batch_size=n, lr=1e-2, weight_decay=0.0, seed=0, progress=False)
    lines = []
    result = fit(recipe, ImageSet(batch.images, batch.labels, batch.task_ids), None, settings, tmp_path, "gpu",
                 batch.teacher_features, log=lines.append, device="cuda")
    assert result.device.startswith("cuda")
    assert result.kernel_backends["lowrank_expert_linear"] == "triton"
    assert any("triton" in line for line in lines), lines
