#!/usr/bin/env python
"""Benchmark of the fused kernels in medkd.kernels (forward + backward, on a CUDA GPU).

    python bench/kernels.py                  # full benchmark; needs a CUDA GPU
    python bench/kernels.py --quick          # one shape per op, bf16 only
    python bench/kernels.py --interpret-smoke  # no GPU: one tiny case per op through
                                               # triton's CPU interpreter (code-path check;
                                               # add --out FILE to also write its JSON)
    python bench/kernels.py --compile-check  # no GPU: compile the kernels for sm_80/sm_90
                                               # and report shared memory / pipelining / MMA
    python bench/kernels.py --list-lorkd-shapes  # no GPU: print the expert-layer shapes that
                                               # recipe=lorkd's default student produces
    python bench/kernels.py --tune           # GPU: time candidate tiles of the expert
                                               # linear's forward and backward kernels at
                                               # LoRKD's shapes; write the winners

What is timed (milliseconds, median of triton.testing.do_bench):

* low-rank expert linear, LoRKD training setting: W0 and b frozen, x, A, B require grad;
  forward + backward (y, dx, dA, dB) of
    fused    lowrank_expert_linear(backend="triton")
    eager    lowrank_expert_linear_reference (PyTorch eager)
    compile  torch.compile(lowrank_expert_linear_reference)
    dense    y = x W0^T + b and dx = dy W0 alone: the floor the fused op cannot beat
* CKA loss, distillation setting: student x requires grad, teacher y does not; loss +
  dx of fused / eager / compile as above.

Shapes: the expert linear is timed at square synthetic shapes (LOWRANK_SHAPES) and at
the shapes recipe=lorkd actually produces (`lorkd_shapes`: the student bench/lorkd.py trains and
the data=multitask input, one training batch, every 1x1 conv / linear with an expert, as
(rows, d_in, d_out) with rows = batch x H x W for a 1x1 conv); `--shapes` picks.

Goals (reported, not asserted): fused expert linear <= 1.15x the dense floor and
>= 1.5x faster than eager; fused CKA >= 2x faster than eager.

Results go to bench/results/kernels-<gpu-name-slug>.json (device, versions, every
case's times, ratios, goal verdicts and the tiles the kernels ran with). Without a CUDA GPU
nothing is written.

Tuning (--tune): every candidate in TUNE_CANDIDATES, per kernel (forward, backward) and
dtype, is checked against the current tiles' output and timed at every LoRKD shape; the
score is the time of one training step's calls (each shape's time x its layer count).
bench/results/kernels-tune-<gpu-name-slug>.json holds every score and, under "best", the
winners: copy them into GPU_TILES in kernels/lowrank_expert_linear.py, or point
MEDKD_KERNEL_TILES at the file to use them without editing the code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NO_GPU_MESSAGE = "no CUDA GPU present: kernel benchmark needs one; run on a GPU machine"

GOAL_LOWRANK_VS_DENSE = 1.15  # fused time / dense-GEMM time, at most
GOAL_LOWRANK_VS_EAGER = 1.5   # eager time / fused time, at least
GOAL_CKA_VS_EAGER = 2.0       # eager time / fused time, at least

# (n tokens, d_in = d_out, rank, tasks)
LOWRANK_SHAPES = [(4096, 768, 8, 4), (16384, 768, 16, 8), (4096, 1024, 16, 8), (16384, 1024, 8, 4)]
# (n, d_student, d_teacher)
CKA_SHAPES = [(4096, 192, 192), (16384, 192, 384), (4096, 768, 768), (16384, 1024, 1024)]
DTYPES = ["bfloat16", "float16", "float32"]
# --tune: (block_m, block_n, block_k, num_warps, num_stages); the untuned defaults
# (64, 64, 32, 4, 3) and (64, 128, 64, 4, 3) are among them, and small tiles, since LoRKD's
# layers are narrow (8..1024 channels). float16 takes bfloat16's winner.
TUNE_CANDIDATES = [
    (16, 32, 32, 2, 2), (32, 32, 32, 2, 2), (32, 64, 32, 4, 3), (64, 32, 32, 4, 3),
    (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
]
TUNE_DTYPES = ["float32", "bfloat16"]
# Max |fused - eager| / max |eager| accepted by the pre-timing sanity check.
CHECK_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


def lorkd_shapes(student: str = "mobilenetv3", batch_size: int | None = None) -> list[dict]:
    """(n rows, d_in, d_out, rank, tasks) of every call of the fused expert linear in one
    training forward of recipe=lorkd on data=multitask with `student` (default: the one
    bench/lorkd.py trains, rich in 1x1 convs); shapes only, runs on the CPU."""
    import importlib

    import torch

    from medkd.recipes import build_recipe
    from medkd.toolchain.config import load_config
    from medkd.toolchain.data.base import TaskInfo
    from medkd.toolchain.models import experts
    from medkd.toolchain.models.students import build_student

    cfg = load_config(["recipe=lorkd", "data=multitask", f"student={student}"])
    batch = batch_size or int(cfg.train.batch_size)
    size, names = int(cfg.data.image_size), list(cfg.data.tasks)
    # Class counts do not change any expert layer's shape (heads are plain linears).
    tasks, offset = [], 0
    for name in names:
        tasks.append(TaskInfo(name=name, class_names=[f"{name}:{k}" for k in range(4)], offset=offset))
        offset += 4
    student = build_student(cfg.student, offset, 3, size)
    recipe = build_recipe(cfg.recipe, student, 8, tasks=tasks)
    seen: dict[tuple, int] = {}
    # Both call sites of the op: ExpertConv2d (1x1 convs) and LowRankExpertLinear (linears).
    # (importlib: medkd.kernels re-exports a function under the module's own name)
    kernel_module = importlib.import_module("medkd.kernels.lowrank_expert_linear")

    call_sites = (experts, kernel_module)
    original = kernel_module.lowrank_expert_linear

    def recording(x, task_ids, weight, bias, lora_A, lora_B, scale=1.0, **kwargs):
        key = (x.reshape(-1, x.shape[-1]).shape[0], weight.shape[1], weight.shape[0], lora_A.shape[1], lora_A.shape[0])
        seen[key] = seen.get(key, 0) + 1
        return original(x, task_ids, weight, bias, lora_A, lora_B, scale, **kwargs)

    for site in call_sites:
        site.lowrank_expert_linear = recording
    try:
        with torch.no_grad():
            ids = torch.arange(batch) % len(tasks)
            recipe.student(torch.rand(batch, 3, size, size), ids)
    finally:
        for site in call_sites:
            site.lowrank_expert_linear = original
    return [{"n": n, "d_in": di, "d_out": do, "rank": r, "tasks": t, "layers": c}
            for (n, di, do, r, t), c in sorted(seen.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interpret-smoke", action="store_true",
                      help="run one tiny case per op through triton's CPU interpreter")
    mode.add_argument("--compile-check", action="store_true",
                      help="compile the kernels for sm_80 and sm_90 (no GPU needed)")
    mode.add_argument("--list-lorkd-shapes", action="store_true",
                      help="print the expert-linear shapes of recipe=lorkd's default student and exit")
    mode.add_argument("--tune", action="store_true",
                      help="time candidate tiles of the expert linear's kernels at LoRKD's shapes (GPU)")
    p.add_argument("--lorkd-student", default="mobilenetv3",
                   help="student whose LoRKD expert shapes are timed / listed (bench/lorkd.py's default)")
    p.add_argument("--shapes", choices=["all", "synthetic", "lorkd"], default="all",
                   help="expert-linear shapes to time: square synthetic ones, LoRKD's own, or both")
    p.add_argument("--quick", action="store_true", help="one shape per op, bfloat16 only")
    p.add_argument("--kernels", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"],
                   help="--tune: which of the expert linear's kernels to tune")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                   help=f"dtypes to time (default: {' '.join(DTYPES)}; --tune: {' '.join(TUNE_DTYPES)})")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/...)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing


def time_ms(fn, on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # interpreter smoke: wall clock of one call after one warm-up
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def max_rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- cases


def _shape(n, d_in, d_out, rank, tasks, source="synthetic") -> dict:
    return {"n": n, "d_in": d_in, "d_out": d_out, "rank": rank, "tasks": tasks, "source": source}


def lowrank_case(n, d_in, d_out, rank, tasks, dtype_name, device, use_compile):
    import torch
    import torch.nn.functional as F

    from medkd.kernels import lowrank_expert_linear, lowrank_expert_linear_reference

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=g, device=device) * scale
        return t.to(dtype).requires_grad_(grad)

    x = rnd(n, d_in, grad=True)
    ids = torch.randint(0, tasks, (n,), generator=g, device=device)
    w, b = rnd(d_out, d_in, scale=d_in ** -0.5), rnd(d_out, scale=0.1)  # frozen base
    lora_a = rnd(tasks, rank, d_in, scale=d_in ** -0.5, grad=True)
    lora_b = rnd(tasks, d_out, rank, scale=0.1, grad=True)
    dy = rnd(n, d_out)

    def fwd_bwd(op):
        def run():
            y = op(x, ids, w, b, lora_a, lora_b, 0.5)
            return (y, *torch.autograd.grad(y, (x, lora_a, lora_b), dy))
        return run

    def dense():
        y = F.linear(x, w, b)
        return torch.autograd.grad(y, (x,), dy)

    variants = {
        "fused": fwd_bwd(lambda *a: lowrank_expert_linear(*a, backend="triton")),
        "eager": fwd_bwd(lowrank_expert_linear_reference),
        "dense": dense,
    }
    if use_compile:
        variants["compile"] = fwd_bwd(torch.compile(lowrank_expert_linear_reference, dynamic=False))
    errors = [max_rel_err(a, r) for a, r in zip(variants["fused"](), variants["eager"]())]
    return variants, max(errors)


def cka_case(n, d1, d2, dtype_name, device, use_compile):
    import torch

    from medkd.kernels import cka_loss, cka_loss_reference

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(n, d2, generator=g, device=device).to(dtype)  # teacher: no grad
    mix = torch.randn(d2, d1, generator=g, device=device) / d2 ** 0.5
    x = (y.float() @ mix + torch.randn(n, d1, generator=g, device=device)).to(dtype).requires_grad_()

    def fwd_bwd(op):
        def run():
            loss = op(x, y)
            return (loss, *torch.autograd.grad(loss, (x,)))
        return run

    variants = {
        "fused": fwd_bwd(lambda a, b: cka_loss(a, b, backend="triton")),
        "eager": fwd_bwd(cka_loss_reference),
    }
    if use_compile:
        variants["compile"] = fwd_bwd(torch.compile(cka_loss_reference, dynamic=False))
    errors = [max_rel_err(a, r) for a, r in zip(variants["fused"](), variants["eager"]())]
    return variants, max(errors)


def run_variants(variants, on_gpu):
    times = {}
    for name, fn in variants.items():
        try:
            times[name] = time_ms(fn, on_gpu)
        except Exception as exc:  # e.g. torch.compile failing on this setup: report, go on
            times[name] = None
            print(f"    {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return times


def ratio(num, den):
    return None if num is None or den is None else num / den


def lowrank_tiles(dtype_name: str, rank: int) -> dict:
    """The tiles each expert-linear kernel launches with on a GPU for this dtype and rank."""
    import dataclasses
    import importlib

    import torch

    mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")
    return {k: dataclasses.asdict(mod.gpu_tiles(k, getattr(torch, dtype_name), rank)) for k in mod.KERNELS}


def bench_lowrank(shapes, dtypes, device, on_gpu, use_compile):
    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            n, d_in, d_out, rank, tasks = (shape["n"], shape["d_in"], shape["d_out"], shape["rank"], shape["tasks"])
            variants, err = lowrank_case(n, d_in, d_out, rank, tasks, dtype_name, device, use_compile)
            times = run_variants(variants, on_gpu)
            vs_dense = ratio(times["fused"], times["dense"])
            vs_eager = ratio(times["eager"], times["fused"])
            rows.append({
                "op": "lowrank_expert_linear", "dtype": dtype_name,
                "n": n, "d_in": d_in, "d_out": d_out, "rank": rank, "tasks": tasks,
                "source": shape.get("source", "synthetic"),
                "tiles": lowrank_tiles(dtype_name, rank) if on_gpu else None,
                "max_rel_err_vs_eager": err, "correct": err <= CHECK_TOL[dtype_name],
                "ms": times,
                "fused_over_dense": vs_dense,
                "speedup_vs_eager": vs_eager,
                "speedup_vs_compile": ratio(times.get("compile"), times["fused"]),
                "goal_met": (vs_dense is not None and vs_dense <= GOAL_LOWRANK_VS_DENSE
                             and vs_eager is not None and vs_eager >= GOAL_LOWRANK_VS_EAGER),
            })
            print_row(rows[-1])
    return rows


def bench_cka(shapes, dtypes, device, on_gpu, use_compile):
    rows = []
    for dtype_name in dtypes:
        for n, d1, d2 in shapes:
            variants, err = cka_case(n, d1, d2, dtype_name, device, use_compile)
            times = run_variants(variants, on_gpu)
            vs_eager = ratio(times["eager"], times["fused"])
            rows.append({
                "op": "cka_loss", "dtype": dtype_name, "n": n, "d1": d1, "d2": d2,
                "max_rel_err_vs_eager": err, "correct": err <= CHECK_TOL[dtype_name],
                "ms": times,
                "speedup_vs_eager": vs_eager,
                "speedup_vs_compile": ratio(times.get("compile"), times["fused"]),
                "goal_met": vs_eager is not None and vs_eager >= GOAL_CKA_VS_EAGER,
            })
            print_row(rows[-1])
    return rows


# --------------------------------------------------------------------------- output


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_header():
    print(f"{'op':<8} {'dtype':<9} {'shape':<26} {'fused':>8} {'eager':>8} {'compile':>8} {'dense':>8}"
          f" {'f/dense':>8} {'x eager':>8} {'x comp':>7} {'err':>8} {'ok':>3} {'goal':>4}")


def print_row(r):
    if r["op"] == "cka_loss":
        shape = f"n={r['n']} d={r['d1']}/{r['d2']}"
    else:
        d = r["d_in"] if r["d_in"] == r["d_out"] else f"{r['d_in']}>{r['d_out']}"
        shape = f"n={r['n']} d={d} r={r['rank']} T={r['tasks']}"
    ms = r["ms"]
    print(f"{'cka' if r['op'] == 'cka_loss' else 'lowrank':<8} {r['dtype']:<9} {shape:<26}"
          f" {_fmt(ms['fused']):>8} {_fmt(ms['eager']):>8} {_fmt(ms.get('compile')):>8}"
          f" {_fmt(ms.get('dense')):>8} {_fmt(r.get('fused_over_dense'), '.2f'):>8}"
          f" {_fmt(r['speedup_vs_eager'], '.2f'):>8} {_fmt(r['speedup_vs_compile'], '.2f'):>7}"
          f" {r['max_rel_err_vs_eager']:>8.1e} {'yes' if r['correct'] else 'NO':>3}"
          f" {'yes' if r['goal_met'] else 'no':>4}", flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions():
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- tuning


def _tune_case(shape, dtype, device):
    """Inputs of one LoRKD shape, grouped by task once, and the fp32 projection xa the
    backward reads (from the current tiles' forward)."""
    import importlib

    import torch

    mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")
    g = torch.Generator(device=device).manual_seed(0)
    n, d_in, d_out, rank, tasks = (shape[k] for k in ("n", "d_in", "d_out", "rank", "tasks"))

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    case = {"x": rnd(n, d_in), "w": rnd(d_out, d_in, scale=d_in ** -0.5), "b": rnd(d_out, scale=0.1),
            "a": rnd(tasks, rank, d_in, scale=d_in ** -0.5), "bb": rnd(tasks, d_out, rank, scale=0.1),
            "dy": rnd(n, d_out)}
    case["order"], case["offsets"] = mod._route(torch.randint(0, tasks, (n,), generator=g, device=device), tasks)
    case["xa"] = mod._forward(case["x"], case["order"], case["offsets"], case["w"], case["b"], case["a"],
                              case["bb"], 0.5, store_xa=True)[1]
    return case


def _run_kernel(kernel, case, tiles):
    """One launch of the forward (y, xa) or the backward (dx, dA, dB) with `tiles`."""
    import importlib

    mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")
    c = case
    if kernel == "fwd":
        return mod._forward(c["x"], c["order"], c["offsets"], c["w"], c["b"], c["a"], c["bb"], 0.5,
                            store_xa=True, tiles=tiles)
    return mod._backward(c["dy"], c["x"], c["order"], c["offsets"], c["w"], c["a"], c["bb"], c["xa"], 0.5,
                         True, True, True, tiles=tiles)


def _gpu_timer(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tune_lowrank(shapes, dtypes, device, write, timer=_gpu_timer, candidates=TUNE_CANDIDATES,
                 kernels=("fwd", "bwd")):
    """Score every candidate tiling per (kernel, dtype) with `timer(fn) -> ms`; `write(report)`
    after each (kernel, dtype), so a run cut short keeps what it finished. Returns the report."""
    import dataclasses
    import importlib

    import torch

    mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")
    report = {"shapes": shapes, "scores": {}, "best": {"lowrank_expert_linear": {}}, "speedup_over_current": {}}
    print(f"{'kernel':<4} {'dtype':<9} {'tiles (m,n,k,warps,stages)':<28} {'step ms':>9} {'vs current':>10}")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        cases = [_tune_case(shape, dtype, device) for shape in shapes]
        for kernel in kernels:
            current = [mod.gpu_tiles(kernel, dtype, s["rank"]) for s in shapes]
            refs = [_run_kernel(kernel, c, t) for c, t in zip(cases, current)]
            current_ms = sum(s["layers"] * timer(lambda c=c, t=t: _run_kernel(kernel, c, t))
                             for s, c, t in zip(shapes, cases, current))
            scores = []
            for candidate in candidates:
                tiles = mod.LowRankTiles(*candidate)
                row = {"tiles": dataclasses.asdict(tiles), "step_ms": None, "error": None}
                try:
                    for case, ref in zip(cases, refs):
                        err = max(max_rel_err(o, r) for o, r in zip(_run_kernel(kernel, case, tiles), ref))
                        if err > CHECK_TOL[dtype_name]:
                            raise AssertionError(f"max rel err {err:.1e} against the current tiles")
                    per_shape = [timer(lambda c=c: _run_kernel(kernel, c, tiles)) for c in cases]
                    row["per_shape_ms"] = per_shape
                    row["step_ms"] = sum(s["layers"] * ms for s, ms in zip(shapes, per_shape))
                except Exception as exc:  # out of shared memory, compile failure, wrong output
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                scores.append(row)
                vs = "-" if row["step_ms"] is None else f"{current_ms / row['step_ms']:.2f}x"
                print(f"{kernel:<4} {dtype_name:<9} {str(candidate):<28} {_fmt(row['step_ms']):>9} {vs:>10}"
                      + (f"  {row['error']}" if row["error"] else ""), flush=True)
            timed = [r for r in scores if r["step_ms"] is not None]
            winner = min(timed, key=lambda r: r["step_ms"]) if timed else None
            report["scores"].setdefault(kernel, {})[dtype_name] = {"current_step_ms": current_ms,
                                                                   "candidates": scores}
            if winner:
                best = report["best"]["lowrank_expert_linear"].setdefault(kernel, {})
                best[dtype_name] = winner["tiles"]
                if dtype_name == "bfloat16":
                    best.setdefault("float16", winner["tiles"])  # same width; not timed separately
                report["speedup_over_current"].setdefault(kernel, {})[dtype_name] = current_ms / winner["step_ms"]
                print(f"best {kernel} {dtype_name}: {winner['tiles']} "
                      f"({current_ms / winner['step_ms']:.2f}x the current tiles)", flush=True)
            write(report)
    return report


# --------------------------------------------------------------------------- modes


def compile_check():
    import importlib

    import torch

    from medkd.kernels import triton_available

    if not triton_available():
        print("triton is not installed: nothing to compile")
        return 1
    lowrank_mod = importlib.import_module("medkd.kernels.lowrank_expert_linear")
    cka_mod = importlib.import_module("medkd.kernels.cka")
    print("kernels compiled ahead of time (no GPU needed); fp32 dots follow"
          " torch.backends.cuda.matmul.allow_tf32 (off: FMA, on: TF32 tensor cores)")
    print(f"{'kernel':<12} {'dtype':<9} {'sm':>3} {'smem KB':>8} {'async loads':>11} {'MMA':>10}")
    for capability in (80, 90):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            kernels = {**lowrank_mod.compile_kernels_for_gpu(dtype, capability),
                       **cka_mod.compile_kernels_for_gpu(dtype, capability)}
            for name, k in kernels.items():
                ttgir = k.asm["ttgir"]
                mma = ("wgmma" if "warp_group_dot" in ttgir else
                       "mma" if "#ttg.nvidia_mma" in ttgir else
                       "fma" if "tt.dot" in ttgir else "-")  # "-": kernel has no dot
                print(f"{name:<12} {str(dtype)[6:]:<9} {capability:>3} {k.metadata.shared / 1024:>8.1f}"
                      f" {ttgir.count('async_copy_global_to_local'):>11} {mma:>10}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        # Set before anything imports triton, so its whole runtime starts in interpreter mode.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.compile_check:
        return compile_check()
    if args.list_lorkd_shapes:
        print(f"{'rows':>7} {'d_in':>5} {'d_out':>5} {'rank':>4} {'tasks':>5} {'layers':>6}")
        for s in lorkd_shapes(args.lorkd_student):
            print(f"{s['n']:>7} {s['d_in']:>5} {s['d_out']:>5} {s['rank']:>4} {s['tasks']:>5} {s['layers']:>6}")
        return 0

    use_compile = not args.no_compile
    if args.interpret_smoke:
        device = torch.device("cpu")
        print("interpreter smoke run (CPU): times are NOT kernel performance; "
              "results are written only with --out")
        print_header()
        lowrank = bench_lowrank([_shape(64, 32, 24, 4, 3)], ["float32"], device, False, use_compile)
        cka = bench_cka([(64, 24, 16)], ["float32"], device, False, use_compile)
        if args.out:
            write_results(args.out, "cpu (triton interpreter smoke run)", lowrank, cka, args)
        return 0

    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32 for every variant
    name = torch.cuda.get_device_name(device)
    if args.tune:
        return tune(args, device, name)
    synthetic = [_shape(n, d, d, r, t) for n, d, r, t in LOWRANK_SHAPES]
    lorkd = [{**s, "source": f"lorkd-{args.lorkd_student}"} for s in lorkd_shapes(args.lorkd_student)]
    lowrank_shapes = {"all": synthetic + lorkd, "synthetic": synthetic, "lorkd": lorkd}[args.shapes]
    cka_shapes, dtypes = CKA_SHAPES, args.dtypes or DTYPES
    if args.quick:
        lowrank_shapes, cka_shapes, dtypes = lowrank_shapes[:1], CKA_SHAPES[1:2], ["bfloat16"]
    print(f"device: {name}  " + "  ".join(f"{k} {v}" for k, v in versions().items()))
    print("times: ms, median, forward+backward; f/dense = fused / dense GEMM floor;"
          " x eager / x comp = speedup of fused over eager / torch.compile")
    print_header()
    lowrank = bench_lowrank(lowrank_shapes, dtypes, device, True, use_compile)
    cka = bench_cka(cka_shapes, dtypes, device, True, use_compile)
    write_results(args.out or RESULTS_DIR / f"kernels-{slug(name)}.json", name, lowrank, cka, args)
    return 0


def tune(args, device, device_name) -> int:
    from medkd.toolchain.atomic import atomic_write_text

    out = args.out or RESULTS_DIR / f"kernels-tune-{slug(device_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"device": device_name, "versions": versions(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "score": "sum over LoRKD shapes of layers x median ms (triton do_bench), one kernel alone"}
    print(f"device: {device_name}  tuning the expert linear at recipe=lorkd's shapes "
          f"(student {args.lorkd_student}); score = one training step's calls, ms")
    shapes = [{**s, "source": f"lorkd-{args.lorkd_student}"} for s in lorkd_shapes(args.lorkd_student)]
    tune_lowrank(shapes, args.dtypes or TUNE_DTYPES, device,
                 lambda report: atomic_write_text(out, json.dumps({**header, **report}, indent=2) + "\n"),
                 kernels=args.kernels)
    print(f"wrote {out}; use it with MEDKD_KERNEL_TILES={out} or copy 'best' into GPU_TILES")
    return 0


def write_results(out: Path, device_name: str, lowrank, cka, args):
    summary = {
        "lowrank_goal_met_all": all(r["goal_met"] for r in lowrank),
        "cka_goal_met_all": all(r["goal_met"] for r in cka),
        "all_correct": all(r["correct"] for r in lowrank + cka),
    }
    from medkd.toolchain.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({
        "device": device_name,
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "goals": {"lowrank_fused_over_dense_max": GOAL_LOWRANK_VS_DENSE,
                  "lowrank_speedup_vs_eager_min": GOAL_LOWRANK_VS_EAGER,
                  "cka_speedup_vs_eager_min": GOAL_CKA_VS_EAGER},
        "summary": summary,
        "cases": lowrank + cka,
    }, indent=2) + "\n")
    print("summary: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in summary.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
