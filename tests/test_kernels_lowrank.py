"""Fused low-rank expert linear: Triton kernels (run on CPU by triton's interpreter)
against the PyTorch reference, plus the dispatcher and the nn.Module.

TRITON_INTERPRET is set per test by an autouse fixture (monkeypatch), not at import,
so other test modules in the same session never see it. That works because
medkd.kernels decorates its kernels lazily, per interpreter mode, and they use only
triton builtins (see _dispatch.LazyKernel).
"""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import medkd.kernels as K
from medkd.kernels import (
    LowRankExpertLinear,
    lowrank_expert_linear,
    lowrank_expert_linear_reference,
)

# The package re-exports the function under the module's name, so fetch the module itself.
lel_mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")

# Tolerances: max |kernel - reference| / max |reference|, per tensor, where the
# reference runs in fp64 on the very same (already rounded) inputs, so only the
# kernel's own error is measured.
# fp32: both sides accumulate in >= fp32; only the summation order differs.
TOL_FP32 = 1e-5
# fp16/bf16: the output (and the rank-r intermediates xa = x A^T, g = dy B fed back to
# the tensor cores) are rounded to 16 bits once each; allow 4 units of roundoff
# (fp16: 2^-11, bf16: 2^-8).
TOL_16BIT = {torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _make(n, d_in, d_out, T, r, dtype=torch.float32, bias=True, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = rnd(n, d_in)
    if ids is None:
        ids = torch.randint(0, T, (n,), generator=g)
    w = rnd(d_out, d_in, s=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    a = rnd(T, r, d_in, s=d_in ** -0.5)
    bb = rnd(T, d_out, r, s=r ** -0.5)
    return x, ids, w, b, a, bb


def _run(fn, x, ids, w, b, a, bb, scale, dy, grad_of=("x", "w", "b", "a", "bb")):
    """Forward + backward; returns y and the grads of the tensors named in grad_of."""
    leaves = {"x": x, "w": w, "b": b, "a": a, "bb": bb}
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_of) if v is not None else None)
              for k, v in leaves.items()}
    y = fn(leaves["x"], ids, leaves["w"], leaves["b"], leaves["a"], leaves["bb"], scale)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def _triton(*args):
    return lowrank_expert_linear(*args, backend="triton")


def _reference_fp64(*args):
    x, ids, w, b, a, bb, scale = args
    cast = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    return lowrank_expert_linear_reference(cast[0], ids, cast[1], cast[2], cast[3], cast[4], scale)


def _check(inputs, scale, dtype, tol, grad_of=("x", "w", "b", "a", "bb")):
    x, ids, w, b, a, bb = inputs
    dy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = _run(_triton, x, ids, w, b, a, bb, scale, dy, grad_of)
    y_ref, grads_ref = _run(_reference_fp64, x, ids, w, b, a, bb, scale, dy.double(), grad_of)
    assert y.dtype == dtype
    assert _rel_err(y, y_ref) <= tol, "forward"
    for name in grad_of:
        if name == "b" and b is None:
            continue
        assert grads[name] is not None and grads[name].dtype == dtype, name
        assert _rel_err(grads[name], grads_ref[name]) <= tol, f"grad of {name}"
    return grads


# (n, d_in, d_out, T, r): odd sizes that are not multiples of the 16-wide interpreter
# tiles, rank 1, a rank above the 16-wide rank tile, single-task (LoRA) and many-task.
SHAPES = {
    "odd": (70, 29, 23, 3, 5),  # ~23 rows per task: two row blocks each
    "rank1": (21, 18, 17, 2, 1),
    "rank17": (19, 20, 33, 2, 17),
    "single_task_lora": (33, 24, 20, 1, 4),
    "narrow_out": (30, 20, 8, 2, 3),  # d_out inside one tile
    "many_tasks": (45, 17, 19, 12, 3),
}


@pytest.mark.parametrize("case", SHAPES)
def test_values_and_grads_match_reference_fp32(case):
    n, d_in, d_out, T, r = SHAPES[case]
    _check(_make(n, d_in, d_out, T, r), scale=0.7, dtype=torch.float32, tol=TOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_and_grads_match_reference_16bit(dtype):
    # bf16 tl.dot is not supported by triton 3.8's interpreter; the kernels widen bf16
    # operands to fp32 under TRITON_INTERPRET only (dot_dtype), so bf16 loads, stores and
    # casts are still exercised here.
    _check(_make(37, 29, 23, 3, 5, dtype=dtype), scale=0.5, dtype=dtype, tol=TOL_16BIT[dtype])


def test_no_bias_and_frozen_base():
    inputs = _make(26, 20, 18, 3, 4, bias=False)
    grads = _check(inputs, scale=2.0, dtype=torch.float32, tol=TOL_FP32, grad_of=("x", "a", "bb"))
    assert grads["w"] is None  # frozen W0: no grad computed


def test_adapter_grads_without_input_grad():
    # x does not require grad (first layer): the kernel skips dx but still gives dA, dB.
    grads = _check(_make(30, 20, 18, 2, 4), scale=1.0, dtype=torch.float32, tol=TOL_FP32,
                   grad_of=("a", "bb"))
    assert grads["x"] is None


def test_every_row_block_is_launched_in_the_worst_case():
    # The grid is a bound computed without the task counts; it is reached exactly when
    # every task has k * BLOCK_M + 1 rows (one nearly empty block per task).
    block_m = lel_mod._tiles("fwd", torch.float32, 4).block_m
    shuffle = torch.randperm(3 * (block_m + 1), generator=torch.Generator().manual_seed(0))
    ids = torch.arange(3).repeat_interleave(block_m + 1)[shuffle]
    n = ids.numel()
    assert lel_mod._num_row_blocks(n, 3, block_m) == 3 * 2
    _check(_make(n, 20, 18, 3, 4, ids=ids), scale=1.0, dtype=torch.float32, tol=TOL_FP32)


def test_empty_tasks_get_exactly_zero_grad():
    T = 6
    ids = torch.tensor([0, 2, 2, 5, 0, 2, 5, 5, 0, 2] * 4)  # tasks 1, 3, 4 have no rows
    x, ids, w, b, a, bb = _make(ids.numel(), 21, 19, T, 3, ids=ids)
    dy = torch.randn(ids.numel(), 19)
    _, grads = _run(_triton, x, ids, w, b, a, bb, 1.0, dy)
    for t in range(T):
        used = bool((ids == t).any())
        assert (grads["a"][t].abs().max() > 0) == used, t
        assert (grads["bb"][t].abs().max() > 0) == used, t
        if not used:
            assert torch.equal(grads["a"][t], torch.zeros_like(grads["a"][t]))
            assert torch.equal(grads["bb"][t], torch.zeros_like(grads["bb"][t]))


def test_expert_grads_come_only_from_own_task_rows():
    x, ids, w, b, a, bb = _make(40, 20, 18, 4, 3)
    dy = torch.randn(40, 18)
    dy[ids != 2] = 0.0  # only task-2 rows carry a gradient
    _, grads = _run(_triton, x, ids, w, b, a, bb, 1.0, dy)
    for t in (0, 1, 3):
        assert torch.equal(grads["a"][t], torch.zeros_like(grads["a"][t]))
        assert torch.equal(grads["bb"][t], torch.zeros_like(grads["bb"][t]))
    assert grads["a"][2].abs().max() > 0


def test_rows_use_only_their_own_expert():
    x, ids, w, b, a, bb = _make(40, 20, 18, 3, 4)
    y = lowrank_expert_linear(x, ids, w, b, a, bb, 1.0, backend="triton")
    a2, bb2 = a.clone(), bb.clone()
    a2[1] += 1.0
    bb2[1] -= 1.0
    y2 = lowrank_expert_linear(x, ids, w, b, a2, bb2, 1.0, backend="triton")
    assert torch.equal(y[ids != 1], y2[ids != 1])
    assert not torch.allclose(y[ids == 1], y2[ids == 1])


def test_leading_dims_and_broadcast_task_ids():
    x, _, w, b, a, bb = _make(2 * 7, 20, 18, 3, 4)
    x3 = x.view(2, 7, 20)
    per_sample = torch.tensor([2, 0])
    y = lowrank_expert_linear(x3, per_sample, w, b, a, bb, 0.5, backend="triton")
    flat_ids = per_sample.repeat_interleave(7)
    y_flat = lowrank_expert_linear(x, flat_ids, w, b, a, bb, 0.5, backend="triton")
    assert y.shape == (2, 7, 18)
    assert torch.equal(y.reshape(14, 18), y_flat)
    y_full = lowrank_expert_linear(x3, flat_ids.view(2, 7), w, b, a, bb, 0.5, backend="triton")
    assert torch.equal(y_full, y)
    with pytest.raises(ValueError, match="prefix"):
        lowrank_expert_linear(x3, torch.zeros(7, dtype=torch.long), w, b, a, bb, backend="triton")


def test_autocast_computes_in_the_autocast_dtype():
    layer = LowRankExpertLinear(20, 18, num_tasks=3, rank=4, freeze_base=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(12, 20)
    ids = torch.randint(0, 3, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, ids, backend="triton")
        y_ref = layer(x, ids, backend="torch")
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, y_ref.float()) <= TOL_16BIT[torch.bfloat16]
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_inference_path_without_autograd_matches():
    x, ids, w, b, a, bb = _make(25, 20, 18, 3, 4)
    with torch.no_grad():
        y = lowrank_expert_linear(x, ids, w, b, a, bb, 0.3, backend="triton")
    y_ref = lowrank_expert_linear_reference(x.double(), ids, w.double(), b.double(), a.double(),
                                            bb.double(), 0.3)
    assert _rel_err(y, y_ref) <= TOL_FP32


def test_empty_batch():
    x, _, w, b, a, bb = _make(4, 20, 18, 3, 4)
    y = lowrank_expert_linear(x[:0], torch.zeros(0, dtype=torch.long), w, b, a, bb, backend="triton")
    assert y.shape == (0, 18)


def test_bad_arguments_are_rejected():
    x, ids, w, b, a, bb = _make(8, 20, 18, 3, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        lowrank_expert_linear(x, torch.full((8,), 3), w, b, a, bb, backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        lowrank_expert_linear(x, ids, w, b, a.double(), bb, backend="triton")
    with pytest.raises(TypeError, match="integer"):
        lowrank_expert_linear(x, ids.float(), w, b, a, bb, backend="triton")
    with pytest.raises(ValueError, match="lora_B"):
        lowrank_expert_linear(x, ids, w, b, a, bb[:, :, :2], backend="triton")


def test_dispatch(monkeypatch):
    x, ids, w, b, a, bb = _make(12, 20, 18, 3, 4)
    launches = []
    real_forward = lel_mod._forward

    def counting_forward(*args, **kw):
        launches.append(1)
        return real_forward(*args, **kw)

    monkeypatch.setattr(lel_mod, "_forward", counting_forward)

    monkeypatch.delenv("TRITON_INTERPRET")
    assert K.resolve_backend("auto", x) == "torch"
    y_cpu = lowrank_expert_linear(x, ids, w, b, a, bb)  # CPU, no interpreter: reference
    assert launches == []
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lowrank_expert_linear(x, ids, w, b, a, bb, backend="triton")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve_backend("auto", x) == "triton"
    y_interp = lowrank_expert_linear(x, ids, w, b, a, bb)
    assert launches == [1]
    assert _rel_err(y_interp, y_cpu) <= TOL_FP32
    lowrank_expert_linear(x, ids, w, b, a, bb, backend="torch")
    assert launches == [1]
    # fp64 has no Triton path: auto falls back to the reference, forcing it is an error.
    lowrank_expert_linear(x.double(), ids, w.double(), b.double(), a.double(), bb.double())
    assert launches == [1]
    with pytest.raises(TypeError, match="supports"):
        lowrank_expert_linear(x.double(), ids, w.double(), b.double(), a.double(), bb.double(),
                              backend="triton")


def test_module_init_fuse_and_from_linear():
    torch.manual_seed(0)
    layer = LowRankExpertLinear(20, 18, num_tasks=3, rank=4, scale=0.5)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad  # freeze_base
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # PEFT init: B = 0 ...
    bound = (1 / 20) ** 0.5  # ... and A kaiming-uniform(a=sqrt(5)) with fan_in = d_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4

    x = torch.randn(10, 20)
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
    base = nn.functional.linear(x, layer.weight, layer.bias)
    assert _rel_err(layer(x, ids), base) <= TOL_FP32  # fresh layer == its base linear

    with torch.no_grad():
        layer.lora_B.normal_()
    for t in range(3):
        fused = layer.fuse(t)
        assert isinstance(fused, nn.Linear)
        routed = layer(x, torch.full((10,), t))
        assert _rel_err(fused(x), routed) <= TOL_FP32
    assert _rel_err(layer.fuse(1)(x), layer.fuse(2)(x)) > 1e-3  # experts really differ

    linear = nn.Linear(20, 18)
    wrapped = LowRankExpertLinear.from_linear(linear, num_tasks=2, rank=3)
    assert torch.equal(wrapped.weight, linear.weight) and torch.equal(wrapped.bias, linear.bias)

    out = layer(x, ids)
    out.square().sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def _has_ptxas():
    triton = K._dispatch.triton
    bundled = triton is not None and (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()
    return bundled or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _has_ptxas(), reason="needs triton and its bundled ptxas to compile for a GPU")
def test_kernels_compile_for_hopper():
    """No GPU here: compile the GPU path ahead of time for sm_90 with the tuned tiles and
    check that the main loops became pipelined (async copies) tensor-core code: wgmma with
    4+ warps (a warp group), mma with fewer (the forward's tuned 2 warps)."""
    compiled = lel_mod.compile_kernels_for_gpu(torch.bfloat16, capability=90)
    for name, kernel in compiled.items():
        ttgir = kernel.asm["ttgir"]
        warps = lel_mod.gpu_tiles(name.removeprefix("lowrank_"), torch.bfloat16, 16).num_warps
        assert kernel.asm["cubin"], name
        if warps >= 4:
            assert "warp_group_dot" in ttgir, f"{name}: no wgmma"
        else:
            assert "#ttg.nvidia_mma" in ttgir, f"{name}: no tensor-core mma"
        assert "async_copy_global_to_local" in ttgir, f"{name}: loads not pipelined"


# --------------------------------------------------------------------------- tiles as data


def test_tiles_reject_what_the_kernels_cannot_launch():
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        lel_mod.LowRankTiles(64, 64, 24, 4, 3)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        lel_mod.LowRankTiles(8, 64, 32, 4, 3)
    with pytest.raises(ValueError, match="num_warps"):
        lel_mod.LowRankTiles(64, 64, 32, 3, 3)


def test_gpu_tiles_come_from_the_table_with_one_stage_less_above_rank_64(monkeypatch):
    monkeypatch.delenv(lel_mod.TILES_ENV, raising=False)
    for (kernel, dtype_name), tiles in lel_mod.GPU_TILES.items():
        dtype = getattr(torch, dtype_name)
        assert lel_mod.gpu_tiles(kernel, dtype, 4) == tiles
        high = lel_mod.gpu_tiles(kernel, dtype, 128)
        assert high.num_stages == (tiles.num_stages - 1 if tiles.num_stages > 2 else tiles.num_stages)
        assert (high.block_m, high.block_n, high.block_k) == (tiles.block_m, tiles.block_n, tiles.block_k)


def _tuning_file(path, best):
    path.write_text(json.dumps({"device": "test", "best": {"lowrank_expert_linear": best}}))
    return str(path)


def test_a_tuning_file_overrides_the_table_where_it_has_an_entry(tmp_path, monkeypatch):
    tuned = {"block_m": 128, "block_n": 32, "block_k": 64, "num_warps": 8, "num_stages": 4}
    monkeypatch.setenv(lel_mod.TILES_ENV, _tuning_file(tmp_path / "tune.json", {"bwd": {"bfloat16": tuned}}))
    assert lel_mod.gpu_tiles("bwd", torch.bfloat16, 4) == lel_mod.LowRankTiles(**tuned)
    assert lel_mod.gpu_tiles("fwd", torch.bfloat16, 4) == lel_mod.GPU_TILES["fwd", "bfloat16"]
    assert lel_mod.gpu_tiles("bwd", torch.float32, 4) == lel_mod.GPU_TILES["bwd", "float32"]
    # The interpreter keeps its small tiles whatever the file says.
    assert lel_mod._tiles("bwd", torch.bfloat16, 4) == lel_mod.INTERPRETER_TILES


@pytest.mark.parametrize("content, fragment", [
    ("not json", "not a kernel tuning file"),
    ('{"best": {}}', "not a kernel tuning file"),
    ('{"best": {"lowrank_expert_linear": {"fwd": {"float32": {"block_m": 24, "block_n": 64, '
     '"block_k": 32, "num_warps": 4, "num_stages": 3}}}}}', "block_m must be a power of two"),
    ('{"best": {"lowrank_expert_linear": {"forward": {}}}}', "unknown kernel"),
])
def test_a_bad_tuning_file_is_a_one_line_error(tmp_path, monkeypatch, content, fragment):
    path = tmp_path / "tune.json"
    path.write_text(content)
    monkeypatch.setenv(lel_mod.TILES_ENV, str(path))
    with pytest.raises(ValueError, match=fragment) as info:
        lel_mod.gpu_tiles("fwd", torch.float32, 4)
    assert "\n" not in str(info.value) and lel_mod.TILES_ENV in str(info.value)


@pytest.mark.parametrize("tiles", [(32, 16, 16, 1, 1), (16, 32, 32, 2, 2)])
def test_explicit_tiles_give_the_same_values_and_grads(tiles):
    x, ids, w, b, a, bb = _make(70, 29, 23, 3, 5)
    tiles = lel_mod.LowRankTiles(*tiles)
    order, offsets = lel_mod._route(ids, 3)
    y, xa = lel_mod._forward(x, order, offsets, w, b, a, bb, 0.7, store_xa=True, tiles=tiles)
    y_ref, xa_ref = lel_mod._forward(x, order, offsets, w, b, a, bb, 0.7, store_xa=True)
    assert _rel_err(y, y_ref) <= TOL_FP32 and _rel_err(xa, xa_ref) <= TOL_FP32
    dy = torch.randn_like(y)
    got = lel_mod._backward(dy, x, order, offsets, w, a, bb, xa, 0.7, True, True, True, tiles=tiles)
    ref = lel_mod._backward(dy, x, order, offsets, w, a, bb, xa, 0.7, True, True, True)
    for g, r in zip(got, ref):
        assert _rel_err(g, r) <= TOL_FP32
