"""Fused low-rank expert linear (LoRKD routing; one expert is plain LoRA).

    y[i] = x[i] W0^T + s * (x[i] A_t^T) B_t^T + b        with t = task_ids[i]

W0: (d_out, d_in) shared base weight, A: (T, r, d_in), B: (T, d_out, r) per-task experts.

Layout of this file: shape/argument checks, the PyTorch reference, the Triton kernels,
their launchers, the torch.library custom ops (forward, backward, autograd), the public
function, and the nn.Module.

How the Triton path works
-------------------------
Rows are grouped by task with one stable sort plus a searchsorted for the task
offsets (device ops, no host sync). Each task's rows are cut into row blocks of at most
BLOCK_M rows; every program owns one row block, so it loads one expert only, and finds
its task and rows itself from the T+1 offsets (a prefix sum over T in registers), so no
per-block table has to be built by a chain of small torch ops. Rows are read and
written in place through the sort permutation (no gathered copy of x or y).

* forward, one kernel: in the K loop each x tile feeds both the base GEMM tile
  (x W0^T) and the rank-r projection xa = x A_t^T (the rank is tiny, so this costs
  r_pad/BLOCK_N extra MMA work instead of a second pass over x); the epilogue adds
  s * xa B_t^T and the bias. xa is written once (fp32, n x r) for the backward.
* backward, one kernel for the expert path:
      dx   = dy W0 + s * g A_t,       g = dy B_t      (g: n x r, per row block)
      dA_t = s * g^T x                (task-t rows only)
      dB_t = s * dy^T xa              (task-t rows only)
  The loop over d_out produces dy W0 and g together; after it the same program has
  g and loads its x tile, so its dA_t contribution costs no extra pass over dy. dB_t
  is taken from the dy tiles already in registers by the programs of the first d_in
  tile. Row blocks of the same task add into dA_t / dB_t with fp32 atomics (so those
  two grads are not bitwise reproducible run to run on a GPU; dx, dW0, db are).
  A task without rows owns no block and its dA_t / dB_t stay exactly zero.
* dW0 = dy^T x and db = sum(dy) (only when W0 / b require grad; frozen by default)
  are plain dense reductions over all rows: cuBLAS does them at roofline, a
  Triton copy would not be faster.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import (
    OP_NAMESPACE,
    SUPPORTED_DTYPES,
    cdiv,
    combine_add,
    compile_for_gpu,
    dot_dtype,
    fp32_dot_precision,
    interpret_enabled,
    lazy_kernel,
    note_backend,
    next_power_of_2,
    resolve_backend,
    tl,
    triton_dtype,
)

# --------------------------------------------------------------------------- checks


def _flatten_inputs(x: torch.Tensor, task_ids: torch.Tensor):
    """(..., d_in) x and task ids shaped like a prefix of x.shape[:-1] -> 2-D x, 1-D ids.

    A prefix shape is broadcast: x (B, L, d_in) with task_ids (B,) routes all L tokens
    of sample b to expert task_ids[b].
    """
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d_in)")
    lead = x.shape[:-1]
    if task_ids.shape != lead:
        k = task_ids.dim()
        if k > len(lead) or tuple(lead[:k]) != tuple(task_ids.shape):
            raise ValueError(
                f"task_ids shape {tuple(task_ids.shape)} must equal x.shape[:-1] = {tuple(lead)} "
                "or a prefix of it")
        task_ids = task_ids.reshape(tuple(task_ids.shape) + (1,) * (len(lead) - k)).expand(lead)
    return x.reshape(-1, x.shape[-1]), task_ids.reshape(-1), lead


def _check_args(x2, ids, weight, bias, lora_A, lora_B):
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError("lora_A must be (T, r, d_in) and lora_B (T, d_out, r)")
    T, r, d_in = lora_A.shape
    d_out = weight.shape[0]
    if weight.shape != (d_out, d_in) or x2.shape[1] != d_in:
        raise ValueError(f"shape mismatch: x (..., {x2.shape[1]}), weight {tuple(weight.shape)}, "
                         f"lora_A {tuple(lora_A.shape)}")
    if lora_B.shape != (T, d_out, r):
        raise ValueError(f"lora_B must be (T, d_out, r) = {(T, d_out, r)}, got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must be ({d_out},), got {tuple(bias.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"task_ids must be an integer tensor, got {ids.dtype}")
    dtypes = {t.dtype for t in (x2, weight, lora_A, lora_B, bias) if t is not None}
    if len(dtypes) != 1:
        raise TypeError("x, weight, bias, lora_A, lora_B must share one dtype, "
                        f"got {sorted(map(str, dtypes))}")


# --------------------------------------------------------------------------- reference


def lowrank_expert_linear_reference(x, task_ids, weight, bias, lora_A, lora_B, scale=1.0):
    """Pure-PyTorch reference (autograd does the backward); also the CPU path."""
    x2, ids, lead = _flatten_inputs(x, task_ids)
    _check_args(x2, ids, weight, bias, lora_A, lora_B)
    T, r, d_in = lora_A.shape
    d_out = weight.shape[0]
    if ids.numel():  # out-of-range ids would silently route to no expert
        in_range = (ids.min() >= 0) & (ids.max() < T)
        if ids.is_cuda:  # no host sync
            torch._assert_async(in_range, "task_ids must lie in [0, num_tasks)")
        elif not bool(in_range):
            raise ValueError(f"task_ids must lie in [0, {T}); got [{int(ids.min())}, {int(ids.max())}]")
    # Route without a host sync and without a per-row copy of the expert weights: project
    # every row with all experts' A at once (one n x (T*r) GEMM; T*r is small), zero the
    # columns that belong to other experts, then one (T*r) -> d_out GEMM. The zeroed
    # columns also make expert t's gradients come from task-t rows only.
    xa = (x2 @ lora_A.reshape(T * r, d_in).t()).view(-1, T, r)
    route = (ids[:, None] == torch.arange(T, device=ids.device)).to(xa.dtype)
    xa = (xa * route[:, :, None]).reshape(-1, T * r)
    b_cat = lora_B.permute(1, 0, 2).reshape(d_out, T * r)  # b_cat[o, t*r + j] = B[t, o, j]
    y = F.linear(x2, weight, bias) + scale * (xa @ b_cat.t())
    return y.reshape(*lead, d_out)


# --------------------------------------------------------------------------- Triton kernels


@lazy_kernel
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, order_ptr, offsets_ptr,
    num_tasks, d_in, d_out, rank, scale,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Axis 0 walks the d_out tiles of one row block back to back, so that row block of x
    # is read from DRAM once and re-served from L2 to its neighbours.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    # Row block pid_m -> (task, rows [start, end) of the sorted order). Kept inline, the
    # same in both kernels: helpers would be frozen at import (see _dispatch.LazyKernel).
    offs_t = tl.arange(0, T_PAD)
    lo = tl.load(offsets_ptr + offs_t, mask=offs_t < num_tasks, other=0)
    hi = tl.load(offsets_ptr + offs_t + 1, mask=offs_t < num_tasks, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.associative_scan(blocks, 0, combine_add)
    task = tl.reduce((blocks_end <= pid_m).to(tl.int32), 0, combine_add)
    if task >= num_tasks:  # past the last block: the grid is an upper bound
        return
    first = tl.reduce(tl.where(offs_t == task, blocks_end - blocks, 0), 0, combine_add)
    start = tl.load(offsets_ptr + task) + (pid_m - first) * BLOCK_M
    end = tl.load(offsets_ptr + task + 1)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_task = a_ptr + task.to(tl.int64) * rank * d_in
    b_task = b_ptr + task.to(tl.int64) * d_out * rank

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    xa = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < d_in
        x = tl.load(x_ptr + rows[:, None] * d_in + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT)
        w_t = tl.load(w_ptr + offs_n[None, :] * d_in + k[:, None],          # W0^T tile (K, N)
                      mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT)
        a_t = tl.load(a_task + offs_r[None, :] * d_in + k[:, None],         # A_t^T tile (K, R)
                      mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        xa = tl.dot(x, a_t, xa, input_precision=PRECISION)

    b_t = tl.load(b_task + offs_n[None, :] * rank + offs_r[:, None],        # B_t^T tile (R, N)
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT)
    acc = tl.dot((xa * scale).to(DOT), b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * d_out + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
    if STORE_XA:
        if pid_n == 0:  # every d_out tile computed the same xa; one writes it
            tl.store(xa_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], xa, mask=mask_m[:, None])


@lazy_kernel
def _bwd_kernel(
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, dx_ptr, da_ptr, db_ptr, order_ptr, offsets_ptr,
    num_tasks, d_in, d_out, rank, scale,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program = (d_in tile, row block of one task). BLOCK_K tiles d_in (the output
    # columns of dx), BLOCK_N tiles d_out (the reduction).
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    # Row block pid_m -> (task, rows [start, end)), exactly as in _fwd_kernel.
    offs_t = tl.arange(0, T_PAD)
    lo = tl.load(offsets_ptr + offs_t, mask=offs_t < num_tasks, other=0)
    hi = tl.load(offsets_ptr + offs_t + 1, mask=offs_t < num_tasks, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.associative_scan(blocks, 0, combine_add)
    task = tl.reduce((blocks_end <= pid_m).to(tl.int32), 0, combine_add)
    if task >= num_tasks:
        return
    first = tl.reduce(tl.where(offs_t == task, blocks_end - blocks, 0), 0, combine_add)
    start = tl.load(offsets_ptr + task) + (pid_m - first) * BLOCK_M
    end = tl.load(offsets_ptr + task + 1)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < d_in
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_n0 = tl.arange(0, BLOCK_N)
    a_task = a_ptr + task.to(tl.int64) * rank * d_in
    b_task = b_ptr + task.to(tl.int64) * d_out * rank

    if COMPUTE_DB:
        # xa was stored unscaled in fp32, zero-padded to BLOCK_R columns.
        xa = tl.load(xa_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], mask=mask_m[:, None], other=0.0)
        xa_s = (xa * scale).to(DOT)
    dx = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    g = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < d_out
        dy = tl.load(dy_ptr + rows[:, None] * d_out + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT)
        b_tile = tl.load(b_task + offs_n[:, None] * rank + offs_r[None, :],   # B_t tile (N, R)
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT)
        g = tl.dot(dy, b_tile, g, input_precision=PRECISION)
        if COMPUTE_DX:
            w = tl.load(w_ptr + offs_n[:, None] * d_in + offs_k[None, :],     # W0 tile (N, K)
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(DOT)
            dx = tl.dot(dy, w, dx, input_precision=PRECISION)
        if COMPUTE_DB:
            if pid_k == 0:  # one d_in tile per row block owns dB_t
                part = tl.dot(tl.trans(dy), xa_s, input_precision=PRECISION)  # (N, R)
                tl.atomic_add(db_ptr + task.to(tl.int64) * d_out * rank
                              + offs_n[:, None] * rank + offs_r[None, :],
                              part, mask=mask_n[:, None] & mask_r[None, :])

    g_s = (g * scale).to(DOT)
    if COMPUTE_DX:
        a_tile = tl.load(a_task + offs_r[:, None] * d_in + offs_k[None, :],    # A_t tile (R, K)
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(DOT)
        dx = tl.dot(g_s, a_tile, dx, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * d_in + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_k[None, :])
    if COMPUTE_DA:
        x = tl.load(x_ptr + rows[:, None] * d_in + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT)
        part = tl.dot(tl.trans(g_s), x, input_precision=PRECISION)             # (R, K)
        tl.atomic_add(da_ptr + task.to(tl.int64) * rank * d_in
                      + offs_r[:, None] * d_in + offs_k[None, :],
                      part, mask=mask_r[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int  # tiles d_out
    block_k: int  # tiles d_in
    num_warps: int
    num_stages: int


def _gpu_config(dtype: torch.dtype, rank: int) -> _Config:
    # Standard Hopper/Ampere GEMM tiles: at rank <= 64 the backward, the larger kernel,
    # needs <= 168 KB of shared memory on sm_90 and <= 100 KB on sm_80 (see
    # `bench/kernels.py --compile-check`); above that, one pipeline stage less.
    # NOT tuned on a GPU yet (none was available while this was written): tune here
    # first if the benchmark misses its goals.
    stages = 3 if rank <= 64 else 2
    if dtype == torch.float32:
        return _Config(64, 64, 32, 4, stages)
    return _Config(64, 128, 64, 4, stages)


def _config(dtype: torch.dtype, rank: int) -> _Config:
    if interpret_enabled():
        # Small tiles: the interpreter runs each program in numpy, and small tiles make
        # the tests' small shapes span several tiles (masking, atomics across blocks).
        return _Config(16, 16, 16, 1, 1)
    return _gpu_config(dtype, rank)


def _block_r(rank: int) -> int:
    return max(16, next_power_of_2(rank))  # tl.dot needs every dimension >= 16


@functools.lru_cache(maxsize=64)
def _task_range(num_tasks: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_tasks + 1, device=device)  # cached: one fewer launch per call


def _route(task_ids: torch.Tensor, num_tasks: int):
    """Group rows by task: ``order`` (row indices sorted by task, stable) and ``offsets``
    (T+1; task t owns order[offsets[t]:offsets[t+1]]). Device ops only, no host sync.

    Also validates the ids: offsets[T] - offsets[0] counts the ids in [0, T), which must
    be all n of them. Checked on the device (asynchronously) for CUDA tensors.
    """
    n = task_ids.numel()
    sorted_ids, order = torch.sort(task_ids.to(torch.int64), stable=True)
    offsets = torch.searchsorted(sorted_ids, _task_range(num_tasks, task_ids.device))
    in_range = offsets[num_tasks] - offsets[0] == n
    if task_ids.is_cuda:
        torch._assert_async(in_range, "task_ids must lie in [0, num_tasks)")
    elif not bool(in_range):
        raise ValueError(f"task_ids must lie in [0, {num_tasks}); got "
                         f"[{int(sorted_ids[0])}, {int(sorted_ids[-1])}]")
    return order, offsets


def _num_row_blocks(n: int, num_tasks: int, block_m: int) -> int:
    """Grid size without knowing the counts n_t (that would need a host sync): the tight
    bound sum_t cdiv(n_t, BM) <= (n + T' (BM - 1)) // BM, T' = min(T, n) non-empty tasks,
    reached when every task has k * BM + 1 rows."""
    return (n + min(num_tasks, n) * (block_m - 1)) // block_m


def _forward(x2, order, offsets, weight, bias, lora_A, lora_B, scale, store_xa):
    n, d_in = x2.shape
    d_out = weight.shape[0]
    T, rank, _ = lora_A.shape
    cfg = _config(x2.dtype, rank)
    block_r = _block_r(rank)
    y = torch.empty(n, d_out, device=x2.device, dtype=x2.dtype)
    xa = torch.empty(n, block_r, device=x2.device, dtype=torch.float32) if store_xa else None
    grid = (cdiv(d_out, cfg.block_n), _num_row_blocks(n, T, cfg.block_m))
    _fwd_kernel[grid](
        x2, weight, bias if bias is not None else weight, lora_A, lora_B, y,
        xa if xa is not None else y, order, offsets,
        T, d_in, d_out, rank, float(scale),
        HAS_BIAS=bias is not None, STORE_XA=store_xa, T_PAD=next_power_of_2(T),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        DOT=dot_dtype(x2.dtype), PRECISION=fp32_dot_precision(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, xa


def _backward(dy, x2, order, offsets, weight, lora_A, lora_B, xa, scale, need_dx, need_da, need_db):
    n, d_in = x2.shape
    d_out = weight.shape[0]
    T, rank, _ = lora_A.shape
    cfg = _config(x2.dtype, rank)
    dev = x2.device
    dx = torch.empty_like(x2) if need_dx else None
    # fp32 accumulators for the atomics; cast to the parameter dtype at the end.
    da = torch.zeros(T, rank, d_in, device=dev, dtype=torch.float32) if need_da else None
    db = torch.zeros(T, d_out, rank, device=dev, dtype=torch.float32) if need_db else None
    grid = (cdiv(d_in, cfg.block_k), _num_row_blocks(n, T, cfg.block_m))
    dummy = dy
    _bwd_kernel[grid](
        dy, x2, weight, lora_A, lora_B, xa if xa is not None else dummy,
        dx if dx is not None else dummy, da if da is not None else dummy,
        db if db is not None else dummy, order, offsets,
        T, d_in, d_out, rank, float(scale),
        COMPUTE_DX=need_dx, COMPUTE_DA=need_da, COMPUTE_DB=need_db, T_PAD=next_power_of_2(T),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(rank),
        DOT=dot_dtype(x2.dtype), PRECISION=fp32_dot_precision(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (dx,
            da.to(lora_A.dtype) if da is not None else None,
            db.to(lora_B.dtype) if db is not None else None)


def compile_kernels_for_gpu(dtype=torch.bfloat16, capability=90, d_in=1024, d_out=1024, rank=16, num_tasks=8):
    """AOT-compile the forward and backward kernels with their GPU tile configs (no GPU
    needed, see ``compile_for_gpu``); returns {name: triton CompiledKernel}."""
    cfg = _gpu_config(dtype, rank)
    t = torch.empty(1, dtype=dtype)
    f32, i64 = torch.empty(1), torch.empty(1, dtype=torch.int64)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(rank),
                DOT=triton_dtype(dtype),
                PRECISION=fp32_dot_precision(), capability=capability, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    scalars = dict(num_tasks=num_tasks, d_in=d_in, d_out=d_out, rank=rank, scale=0.5,
                   T_PAD=next_power_of_2(num_tasks))
    fwd = compile_for_gpu(_fwd_kernel, x_ptr=t, w_ptr=t, bias_ptr=t, a_ptr=t, b_ptr=t, y_ptr=t, xa_ptr=f32,
                          order_ptr=i64, offsets_ptr=i64, HAS_BIAS=True, STORE_XA=True, **scalars, **meta)
    bwd = compile_for_gpu(_bwd_kernel, dy_ptr=t, x_ptr=t, w_ptr=t, a_ptr=t, b_ptr=t, xa_ptr=f32, dx_ptr=t,
                          da_ptr=f32, db_ptr=f32, order_ptr=i64, offsets_ptr=i64, COMPUTE_DX=True,
                          COMPUTE_DA=True, COMPUTE_DB=True, **scalars, **meta)
    return {"lowrank_fwd": fwd, "lowrank_bwd": bwd}


# --------------------------------------------------------------------------- custom ops
#
# The Triton path is registered as two torch.library custom ops, so torch.compile treats
# each as one opaque node (it cannot trace into a Triton launch on a CPU tensor or through
# the interpreter) instead of breaking the graph around it: a fake (meta) implementation
# gives the output shapes, register_autograd ties the backward op to the forward one.
# The forward also returns what the backward needs (the fp32 rank-r projection xa and the
# task grouping order/offsets), so nothing is recomputed and nothing hides in a ctx.


def _fwd_impl(x2: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, store_xa: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, xa, order, offsets); xa is (0, BLOCK_R) when store_xa is False (inference)."""
    order, offsets = _route(ids, lora_A.shape[0])
    y, xa = _forward(x2, order, offsets, weight, bias, lora_A, lora_B, scale, store_xa=store_xa)
    if xa is None:
        xa = x2.new_empty((0, _block_r(lora_A.shape[1])), dtype=torch.float32)
    return y, xa, order, offsets


def _fwd_fake(x2, ids, weight, bias, lora_A, lora_B, scale, store_xa):
    n, (T, rank, _) = x2.shape[0], lora_A.shape
    y = x2.new_empty((n, weight.shape[0]))
    xa = x2.new_empty((n if store_xa else 0, _block_r(rank)), dtype=torch.float32)
    return y, xa, ids.new_empty((n,), dtype=torch.int64), ids.new_empty((T + 1,), dtype=torch.int64)


def _bwd_impl(dy: torch.Tensor, x2: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
              weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
              scale: float, need_dx: bool, need_da: bool, need_db: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dA, dB); a gradient that is not needed comes back as an empty (0,) tensor
    (custom ops cannot return None)."""
    dx, da, db = _backward(dy, x2, order, offsets, weight, lora_A, lora_B, xa, scale, need_dx, need_da, need_db)
    # A fresh empty tensor each: outputs of a custom op must not alias one another.
    return (dx if dx is not None else x2.new_empty((0,)), da if da is not None else lora_A.new_empty((0,)),
            db if db is not None else lora_B.new_empty((0,)))


def _bwd_fake(dy, x2, order, offsets, weight, lora_A, lora_B, xa, scale, need_dx, need_da, need_db):
    return (torch.empty_like(x2) if need_dx else x2.new_empty((0,)),
            torch.empty_like(lora_A) if need_da else lora_A.new_empty((0,)),
            torch.empty_like(lora_B) if need_db else lora_B.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x2, _, weight, bias, lora_A, lora_B, scale, _ = inputs
    _, xa, order, offsets = output
    ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, order, offsets)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward_fn(ctx, dy, _dxa, _dorder, _doffsets):
    x2, weight, lora_A, lora_B, xa, order, offsets = ctx.saved_tensors
    need_dx, _, need_dw, need_dbias, need_da, need_db, _, _ = ctx.needs_input_grad
    dy = dy.contiguous()
    dx = da = db = None
    if need_dx or need_da or need_db:
        if xa.shape[0] != x2.shape[0]:  # the kernel would read past the end of xa
            raise RuntimeError("lowrank_expert_linear_fwd ran with store_xa=False (inference): it has no backward")
        dx, da, db = _bwd_op(dy, x2, order, offsets, weight, lora_A, lora_B, xa, ctx.scale,
                             need_dx, need_da, need_db)
    dw = dy.t() @ x2 if need_dw else None
    dbias = dy.sum(0) if (need_dbias and ctx.has_bias) else None
    return (dx if need_dx else None, None, dw, dbias, da if need_da else None, db if need_db else None,
            None, None)


def _registered(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, OP_NAMESPACE), name)
    except AttributeError:
        return False
    return True


# Registered once per process: if this file is imported a second time under another module
# name (the repository root on sys.path makes it `kernels.lowrank_expert_linear` too, and
# transformers probes for a top-level `kernels` package), the ops of the first import stay.
if not _registered("lowrank_expert_linear_fwd"):
    _bwd_def = torch.library.custom_op(f"{OP_NAMESPACE}::lowrank_expert_linear_bwd", _bwd_impl, mutates_args=())
    _bwd_def.register_fake(_bwd_fake)
    _fwd_def = torch.library.custom_op(f"{OP_NAMESPACE}::lowrank_expert_linear_fwd", _fwd_impl, mutates_args=())
    _fwd_def.register_fake(_fwd_fake)
    _fwd_def.register_autograd(_backward_fn, setup_context=_setup_context)
_fwd_op = getattr(torch.ops, OP_NAMESPACE).lowrank_expert_linear_fwd.default
_bwd_op = getattr(torch.ops, OP_NAMESPACE).lowrank_expert_linear_bwd.default


# --------------------------------------------------------------------------- public API


def lowrank_expert_linear(x, task_ids, weight, bias, lora_A, lora_B, scale=1.0, *, backend="auto"):
    """``y = x W0^T + scale * (x A_t^T) B_t^T + b`` with expert ``t = task_ids`` per row.

    Args:
        x: (..., d_in) activations.
        task_ids: integer ids in [0, T), shaped like x.shape[:-1] or a prefix of it
            (a prefix is broadcast over the remaining leading dims).
        weight: (d_out, d_in) base weight W0; bias: (d_out,) or None.
        lora_A: (T, r, d_in); lora_B: (T, d_out, r). T = 1 is plain LoRA.
        scale: the LoRA scale s (PEFT's alpha / r).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch),
            "triton" or "torch".

    Gradients flow to x, lora_A, lora_B, and to weight / bias only when they require
    grad; expert t's gradients come from task-t rows only (zero for an unused task).
    All floating inputs must share one dtype (fp32, fp16 or bf16 on the Triton path;
    products accumulate in fp32), except under autocast, which casts them as for
    F.linear.
    """
    x2, ids, lead = _flatten_inputs(x, task_ids)
    tensors = [t for t in (x2, ids, weight, bias, lora_A, lora_B) if t is not None]
    chosen = resolve_backend(backend, *tensors)
    if chosen == "triton" and torch.is_autocast_enabled(x2.device.type):
        # Behave like F.linear under autocast: compute in the autocast dtype (the casts
        # are differentiable, so fp32 master parameters still get fp32 grads).
        dt = torch.get_autocast_dtype(x2.device.type)
        x2, weight, lora_A, lora_B = (t.to(dt) for t in (x2, weight, lora_A, lora_B))
        bias = bias.to(dt) if bias is not None else None
        tensors = [t for t in (x2, ids, weight, bias, lora_A, lora_B) if t is not None]
    if chosen == "triton" and x2.dtype not in SUPPORTED_DTYPES:
        if backend == "triton":
            raise TypeError(f"the Triton path supports {SUPPORTED_DTYPES}, got {x2.dtype}")
        chosen = "torch"  # e.g. fp64
    note_backend("lowrank_expert_linear", chosen)
    if chosen == "torch" or x2.shape[0] == 0:
        return lowrank_expert_linear_reference(x, task_ids, weight, bias, lora_A, lora_B, scale)
    _check_args(x2, ids, weight, bias, lora_A, lora_B)
    x2 = x2.contiguous()
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    bias = bias.contiguous() if bias is not None else None
    scale = float(scale)
    # Inference (no grad wanted) skips the xa buffer the backward would need.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    y = _fwd_op(x2, ids, weight, bias, lora_A, lora_B, scale, needs_grad)[0]
    return y.reshape(*lead, weight.shape[0])


class LowRankExpertLinear(nn.Module):
    """A linear layer with one low-rank expert per task (LoRKD); ``num_tasks=1`` is LoRA.

    Init follows PEFT's LoRA: A kaiming-uniform (a=sqrt(5), per expert), B zeros, so a
    fresh layer equals its base linear. ``freeze_base`` freezes W0 and b.
    """

    def __init__(self, in_features, out_features, num_tasks, rank, scale=1.0, bias=True,
                 freeze_base=True, device=None, dtype=None):
        super().__init__()
        if min(in_features, out_features, num_tasks, rank) < 1:
            raise ValueError("in_features, out_features, num_tasks and rank must be >= 1")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_tasks, self.rank, self.scale = num_tasks, rank, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(num_tasks, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(num_tasks, out_features, rank, **kw))
        self.reset_parameters()
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        for t in range(self.num_tasks):  # per expert, so fan_in is d_in (not r * d_in)
            nn.init.kaiming_uniform_(self.lora_A[t], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_tasks, rank, scale=1.0, freeze_base=True):
        """Wrap a trained nn.Linear (its weight and bias are copied) with fresh experts."""
        layer = cls(linear.in_features, linear.out_features, num_tasks, rank, scale,
                    bias=linear.bias is not None, freeze_base=freeze_base,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x, task_ids, backend="auto"):
        return lowrank_expert_linear(x, task_ids, self.weight, self.bias, self.lora_A, self.lora_B,
                                     self.scale, backend=backend)

    @torch.no_grad()
    def fuse(self, task: int) -> nn.Linear:
        """LoRKD parameter fusion for deployment: an nn.Linear with W0 + s * B_t A_t."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        w = self.weight.float() + self.scale * (self.lora_B[task].float() @ self.lora_A[task].float())
        fused = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        fused.weight.copy_(w.to(self.weight.dtype))
        if self.bias is not None:
            fused.bias.copy_(self.bias)
        return fused

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_tasks={self.num_tasks}, rank={self.rank}, scale={self.scale}, "
                f"bias={self.bias is not None}")
