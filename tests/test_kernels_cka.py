"""Fused linear CKA loss: Triton kernels (run on CPU by triton's interpreter) against
the PyTorch reference, the reference against the textbook HSIC formula, and the
dispatcher. TRITON_INTERPRET is set per test (see test_kernels_lowrank.py for why)."""

import importlib
import shutil
from pathlib import Path

import pytest
import torch

import medkd.kernels as K
from medkd.kernels import CKA_DEFAULT_EPS, cka_loss, cka_loss_reference

cka_mod = importlib.import_module("medkd.kernels.cka")

# Tolerances, against an fp64 reference on the very same (already rounded) inputs:
# loss: absolute; gradients: max |error| / max |reference|.
# fp32: fp32 accumulation on both sides, only the summation order differs.
TOL_FP32 = 1e-5
# fp16/bf16: the kernels centre in fp32 and round the centred features (and the
# normalised d x d operands of the backward) to 16 bits for the tensor cores: allow 4
# units of roundoff (fp16: 2^-11, bf16: 2^-8).
TOL_16BIT = {torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _features(n, d1, d2, dtype=torch.float32, seed=0):
    """Correlated X, Y with non-zero means (so the centring matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g) + 3.0
    mix = torch.randn(d1, d2, generator=g) / d1 ** 0.5
    y = x @ mix + 0.5 * torch.randn(n, d2, generator=g) - 2.0
    return x.to(dtype), y.to(dtype)


def _rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _loss_and_grads(fn, x, y):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    loss = fn(x, y)
    gx, gy = torch.autograd.grad(loss, (x, y))
    return loss.detach(), gx, gy


def _check(x, y, tol):
    loss, gx, gy = _loss_and_grads(lambda a, b: cka_loss(a, b, backend="triton"), x, y)
    ref, rgx, rgy = _loss_and_grads(cka_loss_reference, x.double(), y.double())
    assert loss.dtype == torch.float32 and gx.dtype == x.dtype and gy.dtype == y.dtype
    assert abs(loss.item() - ref.item()) <= tol
    assert _rel_err(gx, rgx) <= tol
    assert _rel_err(gy, rgy) <= tol


def _textbook_cka(x, y):
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H), fp64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.t(), y @ y.t()

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


@pytest.mark.parametrize("n,d1,d2", [(60, 7, 11), (6, 30, 20)])  # feature form / Gram form
def test_reference_matches_textbook_hsic(n, d1, d2):
    x, y = _features(n, d1, d2, torch.float64)
    assert cka_mod.feature_form_is_cheaper(n, d1, d2) == (n > d1)
    assert abs(cka_loss_reference(x, y).item() - (1 - _textbook_cka(x, y).item())) < 1e-10


# (n, d1, d2): odd widths (not multiples of the 16-wide interpreter tiles), d1 != d2,
# long batches whose reduction is split over several programs (atomics), and n < d.
CASES = {"odd_widths": (50, 21, 35), "split_rows": (300, 17, 9), "n_below_d": (12, 40, 24)}


@pytest.mark.parametrize("case", CASES)
def test_values_and_grads_match_reference_fp32(case):
    n, d1, d2 = CASES[case]
    splits = -(-n // cka_mod._rows_per_split(n, 3, 16, torch.device("cpu")))
    assert (splits > 1) == (case == "split_rows")  # both code paths are covered
    _check(*_features(n, d1, d2), TOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_and_grads_match_reference_16bit(dtype):
    # bf16 tl.dot is not supported by triton 3.8's interpreter; the kernels widen bf16
    # operands to fp32 under TRITON_INTERPRET only (dot_dtype), so bf16 loads, stores and
    # casts are still exercised here.
    _check(*_features(80, 21, 19, dtype), TOL_16BIT[dtype])


def test_matches_textbook_and_invariances():
    x, y = _features(70, 13, 18)
    loss = cka_loss(x, y, backend="triton")
    assert abs(loss.item() - (1 - _textbook_cka(x, y).item())) <= TOL_FP32
    assert 0.05 < loss.item() < 0.95  # a non-trivial pair
    # linear CKA is invariant to isotropic scaling, shifts and orthogonal maps ...
    q, _ = torch.linalg.qr(torch.randn(18, 18, generator=torch.Generator().manual_seed(1)))
    moved = cka_loss(2.5 * x + 7.0, y @ q, backend="triton")
    assert abs(moved.item() - loss.item()) <= TOL_FP32
    # ... but not to an anisotropic rescaling of the features
    assert abs(cka_loss(x * torch.linspace(0.1, 3, 13), y, backend="triton").item() - loss.item()) > 1e-3
    assert abs(cka_loss(x, x, backend="triton").item()) <= TOL_FP32


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_variance_is_finite(backend):
    _, y = _features(40, 5, 9)
    x = torch.full((40, 5), 0.3)  # every feature constant over the batch
    loss, gx, gy = _loss_and_grads(lambda a, b: cka_loss(a, b, backend=backend), x, y)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # CKA 0, not NaN
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert gx.abs().max() <= 1e-6 and gy.abs().max() <= 1e-6
    loss_both, *_ = _loss_and_grads(lambda a, b: cka_loss(a, b, backend=backend), x, x.clone())
    assert loss_both.item() == pytest.approx(1.0, abs=1e-6)
    # eps only floors degenerate inputs: tiny but genuine variation is still measured
    tiny = x + 1e-3 * torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    assert cka_loss(tiny, tiny.clone(), backend=backend).item() == pytest.approx(0.0, abs=1e-4)
    assert CKA_DEFAULT_EPS == 1e-12


def test_eps_floor_stops_the_gradient_through_the_floored_norm():
    # Below eps, ||Sxx||^2 is replaced by the constant eps, so its gradient term must be
    # zero (as autograd gives for the reference's clamp_min); above eps it is not.
    def finalize(hxx, hyy, hxy):  # two partials per term, as several programs would give
        return cka_mod._finalize_from_partials(torch.tensor([[hxx, hyy, hxy]] * 2) / 2, 1e-12, 10)

    loss, coef = finalize(1e-14, 2.0, 1e-20)
    assert coef[cka_mod._CX] == 0 and coef[cka_mod._CY] != 0 and coef[cka_mod._CXY] != 0
    loss, coef = finalize(1.0, 4.0, 0.5)  # CKA = 0.5 / (1 * 2)
    assert loss.item() == pytest.approx(0.75) and (coef != 0).all()


def test_grad_only_where_needed_and_trailing_dims():
    x, y = _features(40, 24, 10)
    x4 = x.view(40, 2, 3, 4).requires_grad_()  # e.g. (n, C, H, W) feature maps
    loss = cka_loss(x4, y, backend="triton")  # y is a fixed teacher target
    (gx,) = torch.autograd.grad(loss, (x4,))
    assert gx.shape == x4.shape
    ref, rgx, _ = _loss_and_grads(cka_loss_reference, x.double(), y.double())
    assert abs(loss.item() - ref.item()) <= TOL_FP32 and _rel_err(gx.reshape(40, 24), rgx) <= TOL_FP32


def test_mixed_dtypes_are_promoted():
    x, y = _features(40, 12, 10)
    mixed = cka_loss(x.to(torch.bfloat16), y, backend="triton")  # bf16 student, fp32 teacher
    ref = cka_loss_reference(x.to(torch.bfloat16).double(), y.double())
    assert mixed.dtype == torch.float32 and abs(mixed.item() - ref.item()) <= TOL_FP32


def test_dispatch(monkeypatch):
    calls = []
    real = cka_mod._covariances
    monkeypatch.setattr(cka_mod, "_covariances", lambda *a: calls.append(1) or real(*a))
    x, y = _features(40, 8, 6)

    monkeypatch.delenv("TRITON_INTERPRET")
    assert K.resolve_backend("auto", x, y) == "torch"
    ref = cka_loss(x, y)  # CPU without the interpreter: reference
    assert calls == []
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cka_loss(x, y, backend="triton")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert abs(cka_loss(x, y).item() - ref.item()) <= TOL_FP32
    assert calls == [1]
    cka_loss(x, y, backend="torch")
    cka_loss(x.double(), y.double())  # fp64: no Triton path, auto falls back
    assert calls == [1]
    wide_x, wide_y = _features(6, 30, 20)  # n << d: auto keeps the cheaper n x n reference
    cka_loss(wide_x, wide_y)
    assert calls == [1]
    cka_loss(wide_x, wide_y, backend="triton")  # forced: the d x d kernels still run
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="same n"):
        cka_loss(x, y[:-1])
    with pytest.raises(ValueError, match="backend"):
        cka_loss(x, y, backend="cuda")


def _has_ptxas():
    triton = K._dispatch.triton
    bundled = triton is not None and (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()
    return bundled or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _has_ptxas(), reason="needs triton and its bundled ptxas to compile for a GPU")
def test_kernels_compile_for_hopper():
    """No GPU here: compile the GPU path ahead of time for sm_90 and check that the main
    loops became pipelined (async copies) tensor-core (wgmma) code."""
    compiled = cka_mod.compile_kernels_for_gpu(torch.bfloat16, capability=90)
    assert all(kernel.asm["cubin"] for kernel in compiled.values())
    for name in ("cka_cov", "cka_grad"):  # the two GEMM-shaped kernels
        ttgir = compiled[name].asm["ttgir"]
        assert "warp_group_dot" in ttgir, f"{name}: no wgmma"
        assert "async_copy_global_to_local" in ttgir, f"{name}: loads not pipelined"
