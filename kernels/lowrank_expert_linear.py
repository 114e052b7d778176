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
* backward, one kernel for dx and dA:
      dx   = dy W0 + s * g A_t,       g = dy B_t      (g: n x r, per row block)
      dA_t = s * g^T x                (task-t rows only)
  The loop over d_out produces dy W0 and g together; after it the same program has
  g and loads its x tile, so its dA_t contribution costs no extra pass over dy. Row
  blocks of the same task add into dA_t with fp32 atomics (so dA is not bitwise
  reproducible run to run on a GPU; dx, dB, dW0, db are). A task without rows owns no
  block and its dA_t stays exactly zero.
* dB_t = s * dy^T xa_t (task-t rows only) is one cuBLAS GEMM over all rows: xa's r
  columns are placed in task t's block of an n x (T*r) matrix, zeros elsewhere, so a
  row reaches its own expert only and a task without rows gets exactly zero. (It was
  first fused into the backward kernel, from the dy tiles in registers; on an H100 with
  triton 3.6 that gave wrong dB in fp32 while bf16 was right, and the interpreter
  could not show it. The GEMM reads dy once more, n x d_out, which is small beside
  the kernel's pass over dy for every d_in tile.)
* dW0 = dy^T x and db = sum(dy) (only when W0 / b require grad; frozen by default)
  are plain dense reductions over all rows: cuBLAS does them at roofline, a
  Triton copy would not be faster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
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
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, da_ptr, order_ptr, offsets_ptr,
    num_tasks, d_in, d_out, rank, scale,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, T_PAD: tl.constexpr,
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
class LowRankTiles:
    """Launch configuration of one of this file's kernels (forward or backward)."""

    block_m: int  # rows per program (one task's row block)
    block_n: int  # tiles d_out
    block_k: int  # tiles d_in
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got "
                             f"{self.num_warps}, {self.num_stages}")


KERNELS = ("fwd", "bwd")

# GPU tiles per (kernel, dtype) at rank <= 64, tuned by `bench/kernels.py --tune` on an
# H100 (triton 3.6) at the shapes recipe=lorkd produces (narrow layers, 128..32768 rows):
# bench/results/kernels-tune-nvidia-h100-80gb-hbm3-*.json. Speed-up over the untuned GEMM
# tiles (64x64x32 fp32, 64x128x64 16-bit, 4 warps, 3 stages), per training step's calls:
# fwd fp32 1.38x, fwd bf16 1.42x, bwd bf16 1.33x; bwd fp32 1.31x is the best of the 6 of 8
# candidates timed before that run's time limit. float16 takes bfloat16's (same width, not
# timed). Another GPU can use its own tuning file through MEDKD_KERNEL_TILES.
GPU_TILES: dict[tuple[str, str], LowRankTiles] = {
    ("fwd", "float32"): LowRankTiles(16, 32, 32, 2, 2),
    ("fwd", "bfloat16"): LowRankTiles(16, 32, 32, 2, 2),
    ("fwd", "float16"): LowRankTiles(16, 32, 32, 2, 2),
    ("bwd", "float32"): LowRankTiles(64, 64, 64, 4, 3),
    ("bwd", "bfloat16"): LowRankTiles(64, 32, 32, 4, 3),
    ("bwd", "float16"): LowRankTiles(64, 32, 32, 4, 3),
}
# Small tiles under the interpreter: it runs each program in numpy, and small tiles make
# the tests' small shapes span several tiles (masking, atomics across blocks).
INTERPRETER_TILES = LowRankTiles(16, 16, 16, 1, 1)
TILES_ENV = "MEDKD_KERNEL_TILES"


def tiles_from_file(path: str) -> dict[tuple[str, str], LowRankTiles]:
    """The lowrank_expert_linear section of a tuning file (what `bench/kernels.py --tune`
    writes under "best"): {"fwd": {"bfloat16": {"block_m": ..., ...}, ...}, "bwd": {...}}."""
    import json

    try:
        with open(path) as f:
            section = json.load(f)["best"]["lowrank_expert_linear"]
        table = {(kernel, dtype): LowRankTiles(**fields)
                 for kernel, per_dtype in section.items() for dtype, fields in per_dtype.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{TILES_ENV}={path}: not a kernel tuning file from bench/kernels.py --tune "
                         f"({type(exc).__name__}: {exc})") from None
    unknown = sorted(set(section) - set(KERNELS))
    if unknown:
        raise ValueError(f"{TILES_ENV}={path}: unknown kernel(s) {unknown}; expected {list(KERNELS)}")
    return table


@functools.lru_cache(maxsize=8)
def _tiles_file(path: str) -> dict[tuple[str, str], LowRankTiles]:
    return tiles_from_file(path)


def gpu_tiles(kernel: str, dtype: torch.dtype, rank: int) -> LowRankTiles:
    """The tiles `kernel` ("fwd" | "bwd") launches with on a GPU: the tuning file named by
    MEDKD_KERNEL_TILES where it has the entry, else GPU_TILES; one pipeline stage less above
    rank 64 (the backward's shared memory would pass sm_80's limit)."""
    key = (kernel, str(dtype).removeprefix("torch."))
    path = os.environ.get(TILES_ENV)
    tiles = (_tiles_file(path).get(key) if path else None) or GPU_TILES[key]
    if rank > 64 and tiles.num_stages > 2:
        tiles = dataclasses.replace(tiles, num_stages=tiles.num_stages - 1)
    return tiles


def _tiles(kernel: str, dtype: torch.dtype, rank: int) -> LowRankTiles:
    return INTERPRETER_TILES if interpret_enabled() else gpu_tiles(kernel, dtype, rank)


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


def _forward(x2, order, offsets, weight, bias, lora_A, lora_B, scale, store_xa, tiles=None):
    n, d_in = x2.shape
    d_out = weight.shape[0]
    T, rank, _ = lora_A.shape
    cfg = tiles or _tiles("fwd", x2.dtype, rank)
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


def _backward(dy, x2, order, offsets, weight, lora_A, lora_B, xa, scale, need_dx, need_da, need_db,
              tiles=None):
    n, d_in = x2.shape
    d_out = weight.shape[0]
    T, rank, _ = lora_A.shape
    cfg = tiles or _tiles("bwd", x2.dtype, rank)
    dev = x2.device
    dx = torch.empty_like(x2) if need_dx else None
    # fp32 accumulator for the atomics; cast to the parameter dtype at the end.
    da = torch.zeros(T, rank, d_in, device=dev, dtype=torch.float32) if need_da else None
    if need_dx or need_da:
        grid = (cdiv(d_in, cfg.block_k), _num_row_blocks(n, T, cfg.block_m))
        _bwd_kernel[grid](
            dy, x2, weight, lora_A, lora_B, dx if dx is not None else dy, da if da is not None else dy,
            order, offsets, T, d_in, d_out, rank, float(scale),
            COMPUTE_DX=need_dx, COMPUTE_DA=need_da, T_PAD=next_power_of_2(T),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(rank),
            DOT=dot_dtype(x2.dtype), PRECISION=fp32_dot_precision(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    db = _expert_b_grad(dy, xa, order, offsets, T, rank, scale) if need_db else None
    return dx, da.to(lora_A.dtype) if da is not None else None, db


def _expert_b_grad(dy, xa, order, offsets, num_tasks, rank, scale):
    """dB_t = s * dy^T xa over task t's rows, for every t in one GEMM: row i's xa (fp32,
    unscaled, BLOCK_R wide) goes into its task's r columns of an n x (T*r) matrix."""
    n, d_out = dy.shape
    position = torch.arange(n, device=dy.device)
    # offsets[t] <= p < offsets[t+1] for the rows of task t at sorted positions p.
    task = torch.empty_like(order)
    task[order] = torch.searchsorted(offsets[1:], position, right=True)
    routed = xa.new_zeros(n, num_tasks, rank)
    routed.scatter_(1, task[:, None, None].expand(n, 1, rank), xa[:, None, :rank] * scale)
    db = dy.t() @ routed.view(n, num_tasks * rank).to(dy.dtype)  # (d_out, T*r), fp32 accumulate
    return db.view(d_out, num_tasks, rank).permute(1, 0, 2).contiguous()


def compile_kernels_for_gpu(dtype=torch.bfloat16, capability=90, d_in=1024, d_out=1024, rank=16, num_tasks=8):
    """AOT-compile the forward and backward kernels with their GPU tile configs (no GPU
    needed, see ``compile_for_gpu``); returns {name: triton CompiledKernel}."""
    t = torch.empty(1, dtype=dtype)
    f32, i64 = torch.empty(1), torch.empty(1, dtype=torch.int64)
    scalars = dict(num_tasks=num_tasks, d_in=d_in, d_out=d_out, rank=rank, scale=0.5,
                   T_PAD=next_power_of_2(num_tasks))

    def meta(kernel):
        cfg = gpu_tiles(kernel, dtype, rank)
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(rank),
                    DOT=triton_dtype(dtype), PRECISION=fp32_dot_precision(), capability=capability,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    fwd = compile_for_gpu(_fwd_kernel, x_ptr=t, w_ptr=t, bias_ptr=t, a_ptr=t, b_ptr=t, y_ptr=t, xa_ptr=f32,
                          order_ptr=i64, offsets_ptr=i64, HAS_BIAS=True, STORE_XA=True, **scalars, **meta("fwd"))
    bwd = compile_for_gpu(_bwd_kernel, dy_ptr=t, x_ptr=t, w_ptr=t, a_ptr=t, b_ptr=t, dx_ptr=t,
                          da_ptr=f32, order_ptr=i64, offsets_ptr=i64, COMPUTE_DX=True,
                          COMPUTE_DA=True, **scalars, **meta("bwd"))
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
