"""Latency of an ONNX model with onnxruntime on the host CPU.

The session uses CPUExecutionProvider, sequential execution, full graph optimisation
(ORT_ENABLE_ALL) and an explicit intra-op thread count. ``threads=None`` means "all CPUs
this process may run on" (``os.sched_getaffinity``), resolved to a number so the report
states exactly what was measured. Each timed run is one ``session.run`` on the same
fixed random input, timed with ``time.perf_counter``; percentiles use linear
interpolation (numpy), so ``p50 <= p90 <= p99``.

:func:`profile_onnx_cpu` measures batch 1 at one thread count (the pipeline's headline
number); :func:`profile_onnx_matrix` measures every (batch size, thread count) pair,
opening one session per thread count and reusing it across batch sizes (the exported
models have a dynamic batch dimension; a fixed one is reported as a :class:`UserError`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from medkd.toolchain.errors import UserError
from medkd.toolchain.progress import as_policy

__all__ = ["profile_onnx_cpu", "profile_onnx_matrix", "available_cpus"]

PROVIDER = "CPUExecutionProvider"


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve_threads(threads: int | None) -> int:
    """A concrete intra-op thread count (None = all available CPUs)."""
    resolved = available_cpus() if threads is None else int(threads)
    if resolved < 1:
        raise UserError(f"latency threads must be >= 1, got {threads}")
    return resolved


def _check_counts(runs: int, warmup: int) -> None:
    if runs < 1 or warmup < 0:
        raise UserError(f"latency needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")


def _open_session(onnx_path: Path, threads: int):
    """A CPU session with the documented options and `threads` intra-op threads."""
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # Q/DQ graphs log one warning per constant ORT cannot fold
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=[PROVIDER])


def _session_options(sess) -> dict:
    opts = sess.get_session_options()
    return {
        "intra_op_num_threads": opts.intra_op_num_threads,
        "inter_op_num_threads": opts.inter_op_num_threads,
        "execution_mode": str(opts.execution_mode).split(".")[-1],
        "graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
    }


def _check_model_input(sess, shape_chw: tuple[int, ...], batch_sizes: Sequence[int]) -> None:
    """Fail clearly, before any timing, if the model cannot take (B, C, H, W) for every B."""
    inp = sess.get_inputs()[0]
    for want, got in zip(inp.shape[1:], shape_chw):
        if isinstance(want, int) and want != got:
            raise UserError(f"latency input_shape {(1, *shape_chw)} does not match the model input {inp.shape}")
    fixed = inp.shape[0] if inp.shape else None
    if isinstance(fixed, int) and any(b != fixed for b in batch_sizes):
        raise UserError(
            f"the model input {inp.name!r} has a fixed batch dimension of {fixed} ({inp.shape}), so it cannot be "
            f"profiled at batch sizes {list(batch_sizes)}; export it with a dynamic batch (medkd.export.export_onnx)"
        )


def _time_runs(sess, shape: tuple[int, ...], warmup: int, runs: int, bar):
    """Per-run wall times (ms) of `runs` inferences on one fixed input of `shape`, after
    `warmup` untimed ones; also the shape of the first output (proof of the batch fed).
    `bar` (a progress bar, see medkd.toolchain.progress) advances by one per timed run."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times_ms = np.empty(runs, dtype=np.float64)
    out = None
    for i in range(runs):
        t0 = time.perf_counter()
        out = sess.run(None, feed)
        times_ms[i] = (time.perf_counter() - t0) * 1e3
        bar.update(1)
    return times_ms, list(out[0].shape)


def _latency_stats(times_ms: np.ndarray) -> dict:
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "max_ms": float(times_ms.max()),
    }


def profile_onnx_cpu(
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    warmup: int = 10,
    runs: int = 100,
    threads: int | None = None,
    *,
    progress=None,
) -> dict:
    """Time `runs` batch-1 inferences (after `warmup` untimed ones) of an ONNX model.

    `input_shape` is ``(C, H, W)`` or ``(1, C, H, W)``. `progress`: a ProgressPolicy or
    the config's progress value (medkd.toolchain.progress). Returns ``p50_ms, p90_ms, p99_ms, mean_ms,
    min_ms, max_ms, runs, warmup, threads, provider, batch_size, input_shape,
    onnxruntime_version, session_options``.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise UserError(f"latency input_shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    _check_counts(runs, warmup)
    threads = _resolve_threads(threads)

    sess = _open_session(onnx_path, threads)
    _check_model_input(sess, shape[1:], (1,))
    with as_policy(progress).bar(total=runs, desc=f"latency {onnx_path.name}", unit="run") as bar:
        times_ms, _ = _time_runs(sess, shape, warmup, runs, bar)
    return {
        **_latency_stats(times_ms),
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "provider": sess.get_providers()[0],
        "batch_size": 1,
        "input_shape": list(shape),
        "onnxruntime_version": ort.__version__,
        "session_options": _session_options(sess),
    }


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    """`values` as distinct ints >= 1, in the given order."""
    out = [int(v) for v in values]
    if not out or min(out) < 1:
        raise UserError(f"latency {what} must be a non-empty list of integers >= 1, got {list(values)}")
    return list(dict.fromkeys(out))


def profile_onnx_matrix(
    onnx_path: str | os.PathLike,
    input_shape_chw: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 32),
    threads: Sequence[int | None] = (1, None),
    warmup: int = 10,
    runs: int = 100,
    *,
    progress=None,
    keep_times: bool = False,
    bar=None,
) -> list[dict]:
    """CPU latency for every (batch size, thread count): one row per pair, threads-major.

    `input_shape_chw` is ``(C, H, W)``; each batch size B feeds ``(B, C, H, W)``. A
    `threads` entry of None means all available CPUs, resolved to a number; thread counts
    that resolve to the same number are measured once. Each row holds ``batch_size,
    threads, p50_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms`` (per batch),
    ``throughput_ips`` (images/s = batch / mean seconds), ``runs, warmup, input_shape,
    output_shape, provider``. With ``keep_times=True`` each row also has ``times_ms``,
    the raw per-run times as a numpy array (for plots; drop it before writing JSON).
    `bar`: an open progress bar to advance (one bar across several models); else one is
    made from `progress` (see medkd.toolchain.progress).
    """
    onnx_path = Path(onnx_path)
    shape_chw = tuple(int(d) for d in input_shape_chw)
    if len(shape_chw) != 3 or min(shape_chw) < 1:
        raise UserError(f"latency input_shape_chw must be (C, H, W) with positive sizes, got {tuple(input_shape_chw)}")
    batches = _positive_ints(batch_sizes, "batch_sizes")
    if not threads:
        raise UserError("latency threads must be a non-empty list (None = all available CPUs)")
    thread_counts = list(dict.fromkeys(_resolve_threads(t) for t in threads))
    _check_counts(runs, warmup)

    if bar is None:
        total = len(thread_counts) * len(batches) * runs
        with as_policy(progress).bar(total=total, desc=f"latency {onnx_path.name}", unit="run") as own_bar:
            return _profile_matrix(onnx_path, shape_chw, batches, thread_counts, warmup, runs, keep_times, own_bar)
    return _profile_matrix(onnx_path, shape_chw, batches, thread_counts, warmup, runs, keep_times, bar)


def _profile_matrix(onnx_path: Path, shape_chw, batches, thread_counts, warmup, runs, keep_times, bar) -> list[dict]:
    rows = []
    for n_threads in thread_counts:
        sess = _open_session(onnx_path, n_threads)  # session creation is slow: reuse across batches
        _check_model_input(sess, shape_chw, batches)
        for batch in batches:
            shape = (batch, *shape_chw)
            times_ms, out_shape = _time_runs(sess, shape, warmup, runs, bar)
            stats = _latency_stats(times_ms)
            row = {
                "batch_size": batch,
                "threads": n_threads,
                **stats,
                "throughput_ips": batch / (stats["mean_ms"] / 1e3),
                "runs": runs,
                "warmup": warmup,
                "input_shape": list(shape),
                "output_shape": out_shape,
                "provider": sess.get_providers()[0],
            }
            if keep_times:
                row["times_ms"] = times_ms
            rows.append(row)
    return rows
