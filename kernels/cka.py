"""Fused linear CKA loss: ``1 - CKA(X, Y)`` for feature batches X (n x d1), Y (n x d2).

    Xc, Yc = X - mean(X), Y - mean(Y)                       (column means over the batch)
    Sxy = Xc^T Yc / n,  Sxx = Xc^T Xc / n,  Syy = Yc^T Yc / n
    hxy, hxx, hyy = ||Sxy||_F^2, ||Sxx||_F^2, ||Syy||_F^2   (the three linear-HSIC terms)
    CKA = hxy / (sqrt(max(hxx, eps)) * sqrt(max(hyy, eps)))

Which formulation: HSIC can be computed from the d x d feature covariances (above,
cost ~ n (d1^2 + d2^2 + d1 d2)) or from the n x n Gram matrices K = Xc Xc^T, L = Yc Yc^T
(hxy = <K, L>, cost ~ n^2 (d1 + d2)). Distillation batches have n (tokens or pixels x
images) well above d, so the Triton kernels implement the feature form and never build
an n x n matrix. When n is the small side (a few images with huge flattened features),
the Gram form is cheaper and ``backend="auto"`` uses the reference, which picks the
cheaper form itself (``feature_form_is_cheaper``).

Zero variance: a constant X (or Y) makes Sxx = 0 and CKA 0/0. The eps floor on hxx and
hyy keeps the loss finite: the loss is then 1 (CKA 0) and its gradient 0. The 1/n in S
makes hxx = ||Cov(X)||_F^2 >= sum_i var(X_i)^2, independent of the batch size, so the
default eps=1e-12 only bites when every feature's std is below ~1e-3 (a batch of
unit-variance features has hxx >= d); far from that floor it changes nothing.

Triton path: forward = column means (torch, one read pass) + one kernel launch per S
block (Sxx, Syy upper-triangle tiles only, Sxy) with the centering fused into the tile
loads + one launch for the squared norms + one single-program launch for the loss and
the backward's scalars (no host sync anywhere). Backward = one kernel per input:
    dX = g * (cx Xc Sxx + cxy Yc Sxy^T),   dY = g * (cy Yc Syy + cxy Xc Sxy)
again centering on load. Centering's own backward (subtract the column mean of the
gradient) is skipped: the gradient above is a product with the centered matrix, whose
column means are already zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import (
    SUPPORTED_DTYPES,
    cdiv,
    combine_add,
    compile_for_gpu,
    dot_dtype,
    fp32_dot_precision,
    interpret_enabled,
    lazy_kernel,
    next_power_of_2,
    note_backend,
    num_sms,
    resolve_backend,
    tl,
    triton_dtype,
)

DEFAULT_EPS = 1e-12

# --------------------------------------------------------------------------- shared


def _as_2d(x: torch.Tensor, y: torch.Tensor):
    """(n, ...) feature batches -> (n, d) each, in one common dtype."""
    if x.dim() < 2 or y.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (n, ...) with the same n, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("CKA needs at least one sample")
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"x and y must be floating point, got {x.dtype}, {y.dtype}")
    return x.reshape(x.shape[0], -1).to(dtype), y.reshape(y.shape[0], -1).to(dtype)


def feature_form_is_cheaper(n: int, d1: int, d2: int) -> bool:
    """Multiply-adds of the d x d covariance form vs the n x n Gram form."""
    return n * (d1 * d1 + d2 * d2 + d1 * d2) <= n * n * (d1 + d2 + 3)


# --------------------------------------------------------------------------- reference


def cka_loss_reference(x, y, eps=DEFAULT_EPS):
    """Pure-PyTorch ``1 - linear CKA`` (autograd backward); also the CPU path.

    Products run in the input dtype (fp32 accumulate, like the kernels); the small
    d x d (or n x n) matrices and the loss are fp32 (fp64 for fp64 inputs).
    """
    x2, y2 = _as_2d(x, y)
    n, d1 = x2.shape
    d2 = y2.shape[1]
    acc = torch.promote_types(x2.dtype, torch.float32)
    xc = x2 - x2.mean(0, keepdim=True)
    yc = y2 - y2.mean(0, keepdim=True)
    if feature_form_is_cheaper(n, d1, d2):
        sxy = (xc.t() @ yc).to(acc) / n
        sxx = (xc.t() @ xc).to(acc) / n
        syy = (yc.t() @ yc).to(acc) / n
        hxy, hxx, hyy = sxy.square().sum(), sxx.square().sum(), syy.square().sum()
    else:  # n x n Gram form: <K, L> = ||Xc^T Yc||_F^2, same 1/n^2 normalisation
        k = (xc @ xc.t()).to(acc) / n
        l = (yc @ yc.t()).to(acc) / n
        hxy, hxx, hyy = (k * l).sum(), k.square().sum(), l.square().sum()
    cka = hxy / (hxx.clamp_min(eps).sqrt() * hyy.clamp_min(eps).sqrt())
    return 1.0 - cka


# --------------------------------------------------------------------------- Triton kernels


@lazy_kernel
def _cov_kernel(
    a_ptr, b_ptr, ma_ptr, mb_ptr, s_ptr,
    n, da, db, rows_per_split, inv_n,
    SYMMETRIC: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """S[i, j] += sum over this program's rows of (A - ma)[:, i] (B - mb)[:, j] / n.

    Grid: (tiles of S, row splits). With SYMMETRIC (A is B) only tiles on or above the
    diagonal run and each off-diagonal tile is also written mirrored, so S comes out
    full at half the MMA work. Row splits add into S with fp32 atomics (ATOMIC); with a
    single split the tile is stored directly (deterministic).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_j = (db + BLOCK_J - 1) // BLOCK_J
    ti = pid // tiles_j
    tj = pid % tiles_j
    if SYMMETRIC:
        if tj < ti:
            return
    offs_i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < da
    mask_j = offs_j < db
    mean_i = tl.load(ma_ptr + offs_i, mask=mask_i, other=0.0)
    mean_j = tl.load(mb_ptr + offs_j, mask=mask_j, other=0.0)
    row0 = split * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, n)

    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, dtype=tl.float32)
    for m0 in range(row0, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        rows64 = rows.to(tl.int64)
        # A^T tile (I, M) and B tile (M, J), centred in fp32. A padded row would load
        # as 0 and centre to -mean: B's padded rows are re-zeroed, which cancels them
        # from every product (A's padded columns only reach masked-out S entries).
        a_t = tl.load(a_ptr + rows64[None, :] * da + offs_i[:, None],
                      mask=mask_i[:, None] & mask_m[None, :], other=0.0)
        a_t = a_t.to(tl.float32) - mean_i[:, None]
        m_b = mask_m[:, None] & mask_j[None, :]
        b = tl.load(b_ptr + rows64[:, None] * db + offs_j[None, :], mask=m_b, other=0.0)
        b = tl.where(m_b, b.to(tl.float32) - mean_j[None, :], 0.0)
        acc = tl.dot(a_t.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
    acc = acc * inv_n

    mask_ij = mask_i[:, None] & mask_j[None, :]
    out = s_ptr + offs_i[:, None] * db + offs_j[None, :]
    # Mirror (j, i) addresses laid out like acc, so no register transpose is needed.
    out_t = s_ptr + offs_j[None, :] * da + offs_i[:, None]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask_ij)
        if SYMMETRIC:
            if tj > ti:
                tl.atomic_add(out_t, acc, mask=mask_ij)
    else:
        tl.store(out, acc, mask=mask_ij)
        if SYMMETRIC:
            if tj > ti:
                tl.store(out_t, acc, mask=mask_ij)


@lazy_kernel
def _grad_kernel(
    a_ptr, ma_ptr, s1_ptr, b_ptr, mb_ptr, s2_ptr, coef_ptr, gout_ptr, out_ptr,
    n, d, ka, kb, s1_sk, s1_sj, s2_sk, s2_sj,
    N1: tl.constexpr, C1: tl.constexpr, N2: tl.constexpr, C2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = g * (c1 * (A - ma) @ (nrm1 * S1) + c2 * (B - mb) @ (nrm2 * S2)), out: (n, d).

    nrm*, c* are entries N1, C1, N2, C2 of ``coef`` (see _finalize). The S operands
    are rescaled to Frobenius norm <= 1 before the cast to the 16-bit dot dtype, so they
    can neither overflow nor flush to zero there; the scalar factors stay in fp32.
    S is addressed through (s_sk, s_sj) strides so Sxy^T needs no copy.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < d
    offs_k = tl.arange(0, BLOCK_K)
    g = tl.load(gout_ptr).to(tl.float32)
    nrm1 = tl.load(coef_ptr + N1)
    nrm2 = tl.load(coef_ptr + N2)

    # Padding needs no re-zeroing here: a padded k column centres to 0 - 0 (the mean
    # loads as 0 there) and meets zero S rows; padded rows only reach masked-out output.
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, ka, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < ka
        a = tl.load(a_ptr + rows64[:, None] * ka + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mean = tl.load(ma_ptr + k, mask=mask_k, other=0.0)
        a = a.to(tl.float32) - mean[None, :]
        s = tl.load(s1_ptr + k[:, None] * s1_sk + cols[None, :] * s1_sj,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc1 = tl.dot(a.to(DOT), (s * nrm1).to(DOT), acc1, input_precision=PRECISION)
    acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, kb, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < kb
        b = tl.load(b_ptr + rows64[:, None] * kb + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mean = tl.load(mb_ptr + k, mask=mask_k, other=0.0)
        b = b.to(tl.float32) - mean[None, :]
        s = tl.load(s2_ptr + k[:, None] * s2_sk + cols[None, :] * s2_sj,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc2 = tl.dot(b.to(DOT), (s * nrm2).to(DOT), acc2, input_precision=PRECISION)
    out = g * (tl.load(coef_ptr + C1) * acc1 + tl.load(coef_ptr + C2) * acc2)
    tl.store(out_ptr + rows64[:, None] * d + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@lazy_kernel
def _sumsq_kernel(s_ptr, part_ptr, size_xx, size_yy, size, BLOCK: tl.constexpr):
    """Partial squared Frobenius norms of one chunk of the [Sxx | Syy | Sxy] buffer:
    part[pid] = (sum Sxx^2, sum Syy^2, sum Sxy^2) over the chunk. Partials (not atomics)
    keep the loss deterministic; _finalize_kernel adds them up."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc_xx = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    acc_yy = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    acc_xy = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    for start in range(pid * BLOCK, size, step):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(s_ptr + offs, mask=offs < size, other=0.0)
        sq = v * v
        acc_xx += tl.where(offs < size_xx, sq, 0.0)
        acc_yy += tl.where((offs >= size_xx) & (offs < size_xx + size_yy), sq, 0.0)
        acc_xy += tl.where(offs >= size_xx + size_yy, sq, 0.0)
    tl.store(part_ptr + pid * 3, tl.reduce(acc_xx, 0, combine_add))
    tl.store(part_ptr + pid * 3 + 1, tl.reduce(acc_yy, 0, combine_add))
    tl.store(part_ptr + pid * 3 + 2, tl.reduce(acc_xy, 0, combine_add))


@lazy_kernel
def _finalize_kernel(part_ptr, num_parts, loss_ptr, coef_ptr, eps, n, P_PAD: tl.constexpr):
    """One program: hxx, hyy, hxy from the partials, then the loss and the backward's
    coefficients (layout _NXX.._CXY, see _finalize) -- scalar math that would otherwise
    be a dozen tiny torch launches."""
    offs = tl.arange(0, P_PAD)
    mask = offs < num_parts
    hxx = tl.reduce(tl.load(part_ptr + offs * 3, mask=mask, other=0.0), 0, combine_add)
    hyy = tl.reduce(tl.load(part_ptr + offs * 3 + 1, mask=mask, other=0.0), 0, combine_add)
    hxy = tl.reduce(tl.load(part_ptr + offs * 3 + 2, mask=mask, other=0.0), 0, combine_add)
    rx = 1.0 / tl.sqrt(tl.maximum(hxx, eps))
    ry = 1.0 / tl.sqrt(tl.maximum(hyy, eps))
    cka = hxy * rx * ry
    rd = tl.sqrt(rx * ry)  # 1 / sqrt(D)
    tl.store(loss_ptr, 1.0 - cka)
    tl.store(coef_ptr + 0, rx)
    tl.store(coef_ptr + 1, ry)
    tl.store(coef_ptr + 2, rd)
    # Below eps the norm is the constant eps: no gradient through it (as clamp_min).
    tl.store(coef_ptr + 3, 2.0 / n * cka * rx * (hxx > eps).to(tl.float32))
    tl.store(coef_ptr + 4, 2.0 / n * cka * ry * (hyy > eps).to(tl.float32))
    tl.store(coef_ptr + 5, -2.0 / n * rd)


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Config:
    cov_m: int     # rows per step of the covariance reduction
    cov_ij: int    # covariance tile side
    grad_m: int
    grad_n: int
    grad_k: int
    num_warps: int
    num_stages: int


def _gpu_config(dtype: torch.dtype) -> _Config:
    # Not tuned: the one GPU lease (H100, 2026-11-27) tuned the expert linear only (see
    # bench/results/kernels-*-nvidia-h100-80gb-hbm3*.json for the CKA timings with these).
    if dtype == torch.float32:
        return _Config(32, 64, 64, 64, 32, 4, 3)
    return _Config(64, 64, 64, 128, 64, 4, 3)


def _config(dtype: torch.dtype) -> _Config:
    if interpret_enabled():
        return _Config(16, 16, 16, 16, 16, 1, 1)  # cheap in numpy; several tiles per test
    return _gpu_config(dtype)


def _rows_per_split(n: int, tiles: int, block_m: int, device: torch.device) -> int:
    """Split the n-reduction when there are too few S tiles to fill the GPU (small d):
    aim for ~2 programs per SM, but keep >= 4 row blocks per program."""
    want = cdiv(2 * num_sms(device), tiles)
    split = max(1, min(want, n // (4 * block_m)))
    return cdiv(cdiv(n, split), block_m) * block_m


def _covariances(x, y, mx, my):
    """Sxx, Syy, Sxy (fp32, / n) from the centred inputs; three launches of _cov_kernel."""
    n, d1 = x.shape
    d2 = y.shape[1]
    cfg = _config(x.dtype)
    bs = cfg.cov_ij
    jobs = []
    for a, ma, b, mb, sym in ((x, mx, x, mx, True), (y, my, y, my, True), (x, mx, y, my, False)):
        ti, tj = cdiv(a.shape[1], bs), cdiv(b.shape[1], bs)
        useful = ti * (ti + 1) // 2 if sym else ti * tj
        rows = _rows_per_split(n, useful, cfg.cov_m, x.device)
        jobs.append((a, ma, b, mb, sym, ti * tj, rows, cdiv(n, rows)))
    atomic = any(splits > 1 for *_, splits in jobs)
    alloc = torch.zeros if atomic else torch.empty  # a single split writes every entry once
    buf = alloc(d1 * d1 + d2 * d2 + d1 * d2, device=x.device, dtype=torch.float32)
    sxx = buf[: d1 * d1].view(d1, d1)
    syy = buf[d1 * d1: d1 * d1 + d2 * d2].view(d2, d2)
    sxy = buf[d1 * d1 + d2 * d2:].view(d1, d2)
    for (a, ma, b, mb, sym, tiles, rows, splits), s in zip(jobs, (sxx, syy, sxy)):
        _cov_kernel[(tiles, splits)](
            a, b, ma, mb, s, n, a.shape[1], b.shape[1], rows, 1.0 / n,
            SYMMETRIC=sym, ATOMIC=splits > 1,
            BLOCK_M=cfg.cov_m, BLOCK_I=bs, BLOCK_J=bs,
            DOT=dot_dtype(x.dtype), PRECISION=fp32_dot_precision(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return buf, sxx, syy, sxy


# Entries of the coefficient vector written by _finalize_kernel, read by _grad_kernel.
_NXX, _NYY, _NXY, _CX, _CY, _CXY = range(6)


def _finalize(s_buf, d1, d2, eps, n):
    """Loss and backward coefficients from the [Sxx | Syy | Sxy] buffer, on the device.

    With hxx' = max(hxx, eps), D = sqrt(hxx' hyy'), CKA = hxy / D and L = 1 - CKA:
      dL/dXc = 2/n * [ cka/hxx' [hxx > eps] Xc Sxx - 1/D Yc Sxy^T ]   (dL/dYc alike)
    written with unit-norm operands Sxx/sqrt(hxx') and Sxy/sqrt(D) (hxy <= D by
    Cauchy-Schwarz): coef = [1/sqrt(hxx'), 1/sqrt(hyy'), 1/sqrt(D),
    2 cka [hxx > eps] / (n sqrt(hxx')), 2 cka [hyy > eps] / (n sqrt(hyy')), -2 / (n sqrt(D))].
    """
    size = s_buf.numel()
    block = 1024
    parts = min(cdiv(size, block), 4 * num_sms(s_buf.device))
    partials = torch.empty(parts, 3, device=s_buf.device, dtype=torch.float32)
    _sumsq_kernel[(parts,)](s_buf, partials, d1 * d1, d2 * d2, size, BLOCK=block)
    return _finalize_from_partials(partials, eps, n)


def _finalize_from_partials(partials, eps, n):
    loss = torch.empty((), device=partials.device, dtype=torch.float32)
    coef = torch.empty(6, device=partials.device, dtype=torch.float32)
    _finalize_kernel[(1,)](partials, partials.shape[0], loss, coef, float(eps), n,
                           P_PAD=next_power_of_2(partials.shape[0]))
    return loss, coef


def _input_grad(a, ma, s1, s1_strides, b, mb, s2, s2_strides, coef, gout, idx):
    n, d = a.shape
    cfg = _config(a.dtype)
    out = torch.empty_like(a)
    grid = (cdiv(d, cfg.grad_n), cdiv(n, cfg.grad_m))
    _grad_kernel[grid](
        a, ma, s1, b, mb, s2, coef, gout, out,
        n, d, a.shape[1], b.shape[1], *s1_strides, *s2_strides,
        N1=idx[0], C1=idx[1], N2=idx[2], C2=idx[3],
        BLOCK_M=cfg.grad_m, BLOCK_N=cfg.grad_n, BLOCK_K=cfg.grad_k,
        DOT=dot_dtype(a.dtype), PRECISION=fp32_dot_precision(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def compile_kernels_for_gpu(dtype=torch.bfloat16, capability=90, d=768):
    """AOT-compile the covariance and gradient kernels with their GPU tile configs (no
    GPU needed, see ``compile_for_gpu``); returns {name: triton CompiledKernel}."""
    cfg = _gpu_config(dtype)
    t, f32 = torch.empty(1, dtype=dtype), torch.empty(1)
    common = dict(DOT=triton_dtype(dtype),
                  PRECISION=fp32_dot_precision(), capability=capability, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    cov = compile_for_gpu(_cov_kernel, a_ptr=t, b_ptr=t, ma_ptr=f32, mb_ptr=f32, s_ptr=f32, n=8192, da=d,
                          db=d, rows_per_split=1024, inv_n=1.0 / 8192, SYMMETRIC=True, ATOMIC=True,
                          BLOCK_M=cfg.cov_m, BLOCK_I=cfg.cov_ij, BLOCK_J=cfg.cov_ij, **common)
    grad = compile_for_gpu(_grad_kernel, a_ptr=t, ma_ptr=f32, s1_ptr=f32, b_ptr=t, mb_ptr=f32, s2_ptr=f32,
                           coef_ptr=f32, gout_ptr=f32, out_ptr=t, n=8192, d=d, ka=d, kb=d, s1_sk=d, s1_sj=1,
                           s2_sk=1, s2_sj=d, N1=_NXX, C1=_CX, N2=_NXY, C2=_CXY,
                           BLOCK_M=cfg.grad_m, BLOCK_N=cfg.grad_n, BLOCK_K=cfg.grad_k, **common)
    sumsq = compile_for_gpu(_sumsq_kernel, s_ptr=f32, part_ptr=f32, size_xx=d * d, size_yy=d * d,
                            size=3 * d * d, BLOCK=1024, capability=capability)
    final = compile_for_gpu(_finalize_kernel, part_ptr=f32, num_parts=528, loss_ptr=f32, coef_ptr=f32,
                            eps=1e-12, n=8192, P_PAD=1024, capability=capability)
    return {"cka_cov": cov, "cka_grad": grad, "cka_sumsq": sumsq, "cka_finalize": final}


class _CKALossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, eps):
        n, d1 = x.shape
        mx = x.mean(0, dtype=torch.float32)
        my = y.mean(0, dtype=torch.float32)
        buf, sxx, syy, sxy = _covariances(x, y, mx, my)
        loss, coef = _finalize(buf, d1, y.shape[1], eps, n)
        ctx.save_for_backward(x, y, mx, my, sxx, syy, sxy, coef)
        return loss

    @staticmethod
    def backward(ctx, gout):
        x, y, mx, my, sxx, syy, sxy, coef = ctx.saved_tensors
        d2 = y.shape[1]
        gout = gout.to(torch.float32).contiguous()
        dx = dy = None
        if ctx.needs_input_grad[0]:  # cx Xc Sxx + cxy Yc Sxy^T
            dx = _input_grad(x, mx, sxx, (sxx.shape[1], 1), y, my, sxy, (1, d2), coef, gout,
                             (_NXX, _CX, _NXY, _CXY))
        if ctx.needs_input_grad[1]:  # cy Yc Syy + cxy Xc Sxy
            dy = _input_grad(y, my, syy, (d2, 1), x, mx, sxy, (d2, 1), coef, gout,
                             (_NYY, _CY, _NXY, _CXY))
        return dx, dy, None


# --------------------------------------------------------------------------- public API


def cka_loss(x, y, eps=DEFAULT_EPS, *, backend="auto"):
    """``1 - linear CKA(x, y)`` as a scalar (fp32; fp64 for fp64 inputs).

    x: (n, ...) and y: (n, ...) feature batches (trailing dims are flattened), any
    widths d1, d2. eps floors the squared norms of the feature covariances (see the
    module docstring). backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1,
    when the d x d form is the cheaper one; else the PyTorch reference), "triton"
    (always the fused d x d form) or "torch".
    """
    x2, y2 = _as_2d(x, y)
    n, d1 = x2.shape
    d2 = y2.shape[1]
    chosen = resolve_backend(backend, x2, y2)
    if chosen == "triton" and x2.dtype not in SUPPORTED_DTYPES:
        if backend == "triton":
            raise TypeError(f"the Triton path supports {SUPPORTED_DTYPES}, got {x2.dtype}")
        chosen = "torch"
    if chosen == "triton" and backend == "auto" and not feature_form_is_cheaper(n, d1, d2):
        chosen = "torch"  # n << d: the reference's n x n Gram form is cheaper
    note_backend("cka", chosen)
    if chosen == "torch":
        return cka_loss_reference(x2, y2, eps)
    return _CKALossFn.apply(x2.contiguous(), y2.contiguous(), float(eps))
