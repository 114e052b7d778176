"""Latency matrix (batch x threads), report figures and the latency markdown table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medkd.export import export_onnx
from medkd.export.plots import latency_table_markdown, plot_accuracy_size_latency, plot_latency_distribution
from medkd.export.profile import available_cpus, profile_onnx_matrix
from medkd.toolchain.errors import UserError

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHW = (1, 16, 16)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_onnx(_tiny_model(), torch.randn(2, *CHW), tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="module")
def matrix(onnx_path):
    return profile_onnx_matrix(onnx_path, CHW, batch_sizes=(1, 4), threads=(1, None), warmup=1, runs=5,
                               progress=False, keep_times=True)


def _assert_png(path, min_side: int = 200) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert min(im.size) >= min_side
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.var() > 0, "blank image"


# --------------------------------------------------------------------------- matrix


def test_matrix_rows_cover_every_batch_and_thread_count(matrix):
    thread_counts = list(dict.fromkeys([1, available_cpus()]))  # None resolves to a number
    assert [(r["threads"], r["batch_size"]) for r in matrix] == [(t, b) for t in thread_counts for b in (1, 4)]
    for r in matrix:
        b = r["batch_size"]
        assert r["input_shape"] == [b, *CHW]
        assert r["output_shape"] == [b, 3]  # the run really fed a batch of b
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_ips"] == pytest.approx(b / (r["mean_ms"] / 1e3))
        assert r["runs"] == 5 and r["warmup"] == 1 and r["provider"] == "CPUExecutionProvider"
        times = r["times_ms"]
        assert times.shape == (5,) and r["mean_ms"] == pytest.approx(times.mean())


def test_matrix_omits_raw_times_by_default(onnx_path):
    rows = profile_onnx_matrix(onnx_path, CHW, batch_sizes=(2,), threads=(1,), warmup=0, runs=1, progress=False)
    assert len(rows) == 1 and "times_ms" not in rows[0]
    assert rows[0]["output_shape"] == [2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"runs": 0}, "runs >= 1"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"batch_sizes": (1, 0)}, "batch_sizes"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"threads": (0,)}, "threads"),
        ({"threads": ()}, "threads"),
    ],
)
def test_matrix_rejects_bad_settings(onnx_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        profile_onnx_matrix(onnx_path, CHW, **{"runs": 1, "progress": False, **kwargs})


def test_matrix_rejects_bad_shapes_and_paths(onnx_path, tmp_path):
    with pytest.raises(UserError, match="does not match"):
        profile_onnx_matrix(onnx_path, (3, 16, 16), runs=1, progress=False)
    with pytest.raises(UserError, match=r"\(C, H, W\)"):
        profile_onnx_matrix(onnx_path, (1, 1, 16, 16), runs=1, progress=False)
    with pytest.raises(UserError, match="not found"):
        profile_onnx_matrix(tmp_path / "missing.onnx", CHW, runs=1, progress=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, used here for a fixed batch
def test_matrix_rejects_fixed_batch_model(tmp_path):
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(_tiny_model(), torch.randn(1, *CHW), path, dynamo=False)  # no dynamic_axes: batch fixed at 1
    with pytest.raises(UserError, match="fixed batch dimension of 1"):
        profile_onnx_matrix(path, CHW, batch_sizes=(1, 8), threads=(1,), runs=1, progress=False)
    # batch 1 only is what this model can do, and is measured
    rows = profile_onnx_matrix(path, CHW, batch_sizes=(1,), threads=(1,), warmup=0, runs=1, progress=False)
    assert rows[0]["output_shape"] == [1, 3]


# --------------------------------------------------------------------------- figures


def test_latency_distribution_png(matrix, tmp_path):
    batch1 = [r for r in matrix if r["batch_size"] == 1]
    times = {"fp32": batch1[0]["times_ms"], "int8": batch1[0]["times_ms"] * 0.6}
    out = plot_latency_distribution(times, tmp_path / "figs" / "latency.png", title="tiny model, batch 1")
    assert out == tmp_path / "figs" / "latency.png"
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["latency.png"]  # no temp file left behind
    size = Image.open(out).size
    # fixed pixel size whatever the data, on the linear and on the log (long tail) axis
    for name, times in {"narrow": [1.0, 2.0], "long_tail": [0.3] * 9 + [8.0]}.items():
        other = plot_latency_distribution({"fp32": np.array(times)}, tmp_path / f"{name}.png")
        _assert_png(other)
        assert Image.open(other).size == size


def test_accuracy_size_latency_png(tmp_path):
    points = [
        {"precision": "fp32", "accuracy": 0.91, "size_bytes": 44_000_000, "p50_ms": 12.5},
        {"precision": "fp16", "accuracy": 0.908, "size_bytes": 22_000_000, "p50_ms": 11.0},
        {"name": "int8", "accuracy": 0.89, "size_bytes": 11_000_000, "p50_ms": 6.2},
    ]
    _assert_png(plot_accuracy_size_latency(points, tmp_path / "acc.png"))


def test_plots_reject_bad_input(tmp_path):
    with pytest.raises(UserError):
        plot_latency_distribution({}, tmp_path / "a.png")
    with pytest.raises(UserError):
        plot_latency_distribution({"fp32": np.array([])}, tmp_path / "a.png")
    with pytest.raises(UserError):
        plot_accuracy_size_latency([], tmp_path / "b.png")
    with pytest.raises(UserError):
        plot_accuracy_size_latency([{"name": "x", "accuracy": 91.0, "size_bytes": 1, "p50_ms": 1.0}], tmp_path / "b.png")
    with pytest.raises(UserError):
        plot_accuracy_size_latency([{"name": "x", "accuracy": 0.9, "p50_ms": 1.0}], tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- table


def test_latency_table_markdown(matrix):
    rows = [{"precision": "fp32", **r} for r in matrix]
    lines = latency_table_markdown(rows)
    assert lines[0] == "| precision | batch | threads | p50 (ms) | p90 (ms) | p99 (ms) | throughput (img/s) |"
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == 8 for line in lines)
    first = rows[0]
    assert lines[2] == (f"| fp32 | {first['batch_size']} | {first['threads']} | {first['p50_ms']:.3f} | "
                        f"{first['p90_ms']:.3f} | {first['p99_ms']:.3f} | {first['throughput_ips']:.1f} |")
    with pytest.raises(UserError):
        latency_table_markdown([])
    with pytest.raises(UserError, match="precision"):
        latency_table_markdown(matrix)
