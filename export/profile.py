"""Latency of an ONNX model with onnxruntime on the host CPU (batch 1).

The session uses CPUExecutionProvider, sequential execution, full graph optimisation
(ORT_ENABLE_ALL) and an explicit intra-op thread count. ``threads=None`` means "all CPUs
this process may run on" (``os.sched_getaffinity``), resolved to a number so the report
states exactly what was measured. Each timed run is one ``session.run`` on the same
fixed random input, timed with ``time.perf_counter``; percentiles use linear
interpolation (numpy), so ``p50 <= p90 <= p99``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from medkd.toolchain.errors import UserError

__all__ = ["profile_onnx_cpu", "available_cpus"]

PROVIDER = "CPUExecutionProvider"


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def profile_onnx_cpu(
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    warmup: int = 10,
    runs: int = 100,
    threads: int | None = None,
    *,
    progress: bool | None = None,
) -> dict:
    """Time `runs` batch-1 inferences (after `warmup` untimed ones) of an ONNX model.

    `input_shape` is ``(C, H, W)`` or ``(1, C, H, W)``. `progress`: show a tqdm bar
    (None = only when stderr is a terminal). Returns ``p50_ms, p90_ms, p99_ms, mean_ms,
    min_ms, max_ms, runs, warmup, threads, provider, batch_size, input_shape,
    onnxruntime_version, session_options``.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise UserError(f"latency input_shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    if runs < 1 or warmup < 0:
        raise UserError(f"latency needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    if threads is None:
        threads = available_cpus()
    if threads < 1:
        raise UserError(f"latency threads must be >= 1, got {threads}")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=[PROVIDER])
    inp = sess.get_inputs()[0]
    for want, got in zip(inp.shape[1:], shape[1:]):
        if isinstance(want, int) and want != got:
            raise UserError(f"latency input_shape {shape} does not match the model input {inp.shape}")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {inp.name: x}

    for _ in range(warmup):
        sess.run(None, feed)
    times_ms = np.empty(runs, dtype=np.float64)
    for i in tqdm(range(runs), desc=f"latency {onnx_path.name}", unit="run", disable=None if progress is None else not progress, leave=False):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times_ms[i] = (time.perf_counter() - t0) * 1e3

    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "max_ms": float(times_ms.max()),
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "provider": sess.get_providers()[0],
        "batch_size": 1,
        "input_shape": list(shape),
        "onnxruntime_version": ort.__version__,
        "session_options": {
            "intra_op_num_threads": opts.intra_op_num_threads,
            "inter_op_num_threads": opts.inter_op_num_threads,
            "execution_mode": str(opts.execution_mode).split(".")[-1],
            "graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
        },
    }
